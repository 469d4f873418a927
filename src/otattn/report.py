"""Result tables as Markdown and commands as page-width lines, for the book's pages.

A chapter shows a table of results with
``IPython.display.Markdown(markdown_table(rows, columns))``: the page renders it as a
table that fits the text column, where a ``print`` of the same rows would be cut at the
right edge.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Format = str | Callable[[Any], str]


def _cell(value: Any, fmt: Format | None) -> str:
    if fmt is None:
        text = str(value)
    elif callable(fmt):
        text = fmt(value)
    else:
        text = format(value, fmt)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    headers: Mapping[str, str] | None = None,
    formats: Mapping[str, Format] | None = None,
    align: Mapping[str, str] | None = None,
) -> str:
    """A Markdown (pipe) table of ``rows``, one line per row, one column per key.

    Parameters
    ----------
    rows
        Mappings from column key to value (e.g. the dicts of ``csv.DictReader``).
    columns
        The keys to show, in order.
    headers
        Header text per key (default: the key itself); Markdown and ``$math$`` allowed.
    formats
        Per key, a format spec for ``format(value, spec)`` (e.g. ``".2e"``) or a
        function from value to text; default ``str``.
    align
        Per key, ``"left"``, ``"right"`` or ``"center"``; default right for numbers
        (``int``, ``float``) in the first row, left otherwise.

    Returns
    -------
    str
        The table, ending in a newline.
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    headers = dict(headers or {})
    formats = dict(formats or {})
    align = dict(align or {})
    for name, mapping in (("headers", headers), ("formats", formats), ("align", align)):
        unknown = sorted(set(mapping) - set(columns))
        if unknown:
            raise ValueError(f"{name} names columns not in `columns`: {unknown}")
    rules = {"left": ":--", "right": "--:", "center": ":-:"}
    for key, side in align.items():
        if side not in rules:
            raise ValueError(f"align[{key!r}] = {side!r}; use one of {sorted(rules)}")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"row {i} lacks the columns {missing}")

    def default_side(key: str) -> str:
        first = rows[0][key] if rows else None
        numeric = isinstance(first, int | float) and not isinstance(first, bool)
        return "right" if numeric else "left"

    lines = [
        "| " + " | ".join(_cell(headers.get(c, c), None) for c in columns) + " |",
        "|" + "|".join(rules[align.get(c) or default_side(c)] for c in columns) + "|",
    ]
    for row in rows:
        cells = (_cell(row[c], formats.get(c)) for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shell_lines(command: str, width: int = 84) -> str:
    """A shell command as lines of at most about ``width`` columns, for a page.

    The words are kept whole and quoted as the shell needs; a line breaks (with ``\\``)
    only before a ``--flag``, which stays with its values.
    """
    groups: list[list[str]] = []
    for word in shlex.split(command):
        if word.startswith("--") or not groups:
            groups.append([])
        groups[-1].append(shlex.quote(word))
    lines = [" ".join(groups[0])] if groups else [""]
    for group in map(" ".join, groups[1:]):
        if len(lines[-1]) + len(group) + 3 > width:
            lines[-1] += " \\"
            lines.append("    " + group)
        else:
            lines[-1] += " " + group
    return "\n".join(lines)
