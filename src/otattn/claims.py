"""The claims ledger: what the two papers claim, what the book measured, a verdict.

The ledger is data, ``book/data/claims.yaml``: a mapping with three lists.

``claims``
    One row per claim of a paper that the book addresses, with the fields of
    ``CLAIM_FIELDS``: a short ``id``, the ``paper`` (``goat`` or ``gated``), ``where``
    in the paper, the ``claim`` in our words, its ``kind`` (``KINDS``), what the book
    ``measured``, the book's ``chapter`` labels that show it, the pytest node ``tests``
    that assert it, a ``verdict`` from ``VERDICTS`` and one line of ``why``.
``untested``
    Claims that no chapter tests (``UNTESTED_FIELDS``), with why.
``departures``
    Where the book's implementation departs from the paper or from the authors' code
    (``DEPARTURE_FIELDS``): what they do, what we do, why, and where the book says so.

:func:`load_claims` reads and checks the file; :func:`missing_tests` and
:func:`missing_labels` say which test ids and chapter labels do not resolve;
:func:`claims_table`, :func:`claim_tests`, :func:`untested_table`,
:func:`departures_table` and :func:`verdict_counts` render the appendix page (book,
``ch-claims``).  Reading the YAML needs PyYAML, imported when a file is loaded.
"""

from __future__ import annotations

import ast
import pathlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from otattn.report import markdown_table

__all__ = [
    "CLAIM_FIELDS",
    "DEPARTURE_FIELDS",
    "KINDS",
    "PAPERS",
    "UNTESTED_FIELDS",
    "VERDICTS",
    "BookLabel",
    "Ledger",
    "book_labels",
    "chapter_labels",
    "check_ledger",
    "claim_tests",
    "claims_table",
    "departures_table",
    "load_claims",
    "missing_labels",
    "missing_tests",
    "test_ids",
    "untested_table",
    "verdict_counts",
]

# "verified" only where a test or a chapter cell asserts it; "not reproduced at this
# scale" where we measure otherwise and the scale may explain it; "contradicted" where
# the measurement contradicts a claim that does not depend on scale.
VERDICTS = (
    "verified",
    "partly",
    "not reproduced at this scale",
    "contradicted",
    "not tested",
)
PAPERS = ("goat", "gated")
KINDS = ("theory", "mechanism", "trained")
CLAIM_FIELDS = tuple(
    "id paper where claim kind measured chapter tests verdict why".split()
)
UNTESTED_FIELDS = ("id", "paper", "where", "claim", "why")
DEPARTURE_FIELDS = ("id", "topic", "theirs", "ours", "why", "chapter")
# Fields that hold a list of strings (a single string is read as a list of one).
_LIST_FIELDS = ("chapter", "tests")
_SECTIONS = {
    "claims": CLAIM_FIELDS,
    "untested": UNTESTED_FIELDS,
    "departures": DEPARTURE_FIELDS,
}
_ID = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
# A MyST target line "(label)=" and a directive option ":label: name".
_TARGET = re.compile(r"^\(([^()\s]+)\)=\s*$")
_OPTION = re.compile(r"^:label:\s*(\S+)\s*$")
_DIRECTIVE = re.compile(r"^[:`]{3,}\{([\w:-]+)\}\s*(.*)$")


@dataclass(frozen=True)
class Ledger:
    """The checked ledger: three tuples of rows, each row a dict of its fields.

    In every row of ``claims`` and ``departures`` the fields ``chapter`` and (in
    ``claims``) ``tests`` are tuples of strings.
    """

    claims: tuple[dict[str, Any], ...]
    untested: tuple[dict[str, Any], ...]
    departures: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class BookLabel:
    """A label of the book: its page (file stem, e.g. ``05_sinks``), a title, the MyST
    role that refers to it (``ref``, or ``prf:ref`` for a proposition), and whether
    it labels the page's title."""

    page: str
    title: str
    role: str = "ref"
    chapter: bool = False


def load_claims(path: str | pathlib.Path) -> Ledger:
    """Read the ledger from a YAML file and check it (:func:`check_ledger`)."""
    import yaml

    path = pathlib.Path(path)
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return check_ledger(data, source=str(path))


def _text(row: Mapping, field: str, where: str) -> str:
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{where}: {field!r} must be a non-empty string, got {value!r}"
        )
    return value.strip()


def _strings(row: Mapping, field: str, where: str) -> tuple[str, ...]:
    value = row[field]
    if isinstance(value, str):
        value = [value]
    if value is None:
        value = []
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v.strip() for v in value
    ):
        raise ValueError(
            f"{where}: {field!r} must be a string or a list of non-empty strings, "
            f"got {value!r}"
        )
    return tuple(v.strip() for v in value)


def _check_row(row: Any, fields: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a row must be a mapping, got {row!r}")
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(f"{where}: missing fields {missing}")
    unknown = sorted(set(row) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; the fields are {fields}")
    checked = {
        f: _strings(row, f, where) if f in _LIST_FIELDS else _text(row, f, where)
        for f in fields
    }
    if not _ID.fullmatch(checked["id"]):
        raise ValueError(
            f"{where}: id must be lower-case words joined by '-', got {checked['id']!r}"
        )
    choices = {"paper": PAPERS, "kind": KINDS, "verdict": VERDICTS}
    for field, allowed in choices.items():
        if field in checked and checked[field] not in allowed:
            raise ValueError(
                f"{where}: {field} must be one of {allowed}, got {checked[field]!r}"
            )
    if "chapter" in checked and not checked["chapter"]:
        raise ValueError(f"{where}: 'chapter' names no label of the book")
    if checked.get("verdict") == "verified" and not checked["tests"]:
        raise ValueError(
            f"{where}: a 'verified' claim must name the tests (or the chapter "
            "execution) that assert it"
        )
    return checked


def check_ledger(data: Any, *, source: str = "ledger") -> Ledger:
    """Check the parsed YAML of a ledger and return it as a :class:`Ledger`.

    ``data`` is a mapping with some of the keys ``claims``, ``untested`` and
    ``departures``, each a list of rows, or a bare list of claims.  Raises
    ``ValueError`` naming ``source``, the row and the field for a missing or unknown
    field, an empty text, an id that is not a slug, an id used twice (in any list), a
    paper, kind or verdict outside ``PAPERS``, ``KINDS``, ``VERDICTS``, a row without a
    chapter label, and a ``verified`` claim that names no test.
    """
    if isinstance(data, list):
        data = {"claims": data}
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{source}: expected a mapping with {sorted(_SECTIONS)} or a list of "
            f"claims, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown sections {unknown}; use {list(_SECTIONS)}")
    sections: dict[str, tuple[dict[str, Any], ...]] = {}
    seen: dict[str, str] = {}
    for name, fields in _SECTIONS.items():
        rows = data.get(name) or []
        if not isinstance(rows, list):
            raise ValueError(f"{source}: {name!r} must be a list of rows")
        checked = []
        for n, row in enumerate(rows):
            label = row.get("id") if isinstance(row, Mapping) else None
            row = _check_row(row, fields, f"{source}, {name}[{n}] ({label})")
            if row["id"] in seen:
                raise ValueError(
                    f"{source}: duplicate id {row['id']!r} in {name!r} "
                    f"(also in {seen[row['id']]!r})"
                )
            seen[row["id"]] = name
            checked.append(row)
        sections[name] = tuple(checked)
    return Ledger(**sections)


def test_ids(ledger: Ledger) -> list[str]:
    """Every pytest node id the claims name, sorted, each once."""
    return sorted({t for row in ledger.claims for t in row["tests"]})


def chapter_labels(ledger: Ledger) -> list[str]:
    """Every book label the claims and departures name, sorted, each once."""
    rows = (*ledger.claims, *ledger.departures)
    return sorted({label for row in rows for label in row["chapter"]})


def book_labels(book_dir: str | pathlib.Path) -> dict[str, BookLabel]:
    """Every label of the pages ``book_dir/*.md``, with its page, title and role.

    A label is a MyST target line ``(label)=``, titled by the heading that follows it,
    or a directive's ``:label:`` option (a proposition, an exercise), titled by the
    directive's argument.  Raises ``ValueError`` if a label is defined twice.
    """
    found: dict[str, BookLabel] = {}
    for path in sorted(pathlib.Path(book_dir).glob("*.md")):
        lines = path.read_text(encoding="utf-8").splitlines()
        name = argument = ""
        for n, line in enumerate(lines):
            head = _DIRECTIVE.match(line)
            if head:
                name, argument = head.group(1), head.group(2).strip()
            target, option = _TARGET.match(line), _OPTION.match(line)
            role, chapter = "ref", False
            if target:
                label = target.group(1)
                after = next((x for x in lines[n + 1 :] if x.strip()), "")
                title = after.lstrip("#").strip() if after.startswith("#") else label
                chapter = after.startswith("# ")
            elif option:
                label = option.group(1)
                title = argument or f"{name.split(':')[-1]} {label}"
                role = "prf:ref" if name.startswith("prf:") else "ref"
            else:
                continue
            if label in found:
                raise ValueError(
                    f"label {label!r} is defined in {found[label].page}.md and again "
                    f"in {path.name}"
                )
            found[label] = BookLabel(path.stem, title, role, chapter)
    return found


def missing_labels(ledger: Ledger, book_dir: str | pathlib.Path) -> list[str]:
    """The labels of :func:`chapter_labels` that no page of ``book_dir`` defines."""
    known = book_labels(book_dir)
    return [label for label in chapter_labels(ledger) if label not in known]


def _defined(tree: ast.Module, names: Sequence[str]) -> bool:
    """Whether ``names`` (a function, or a class and its method) is defined."""
    body: Sequence[ast.stmt] = tree.body
    for name in names:
        match = [
            node
            for node in body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.name == name
        ]
        if not match:
            return False
        body = match[0].body if isinstance(match[0], ast.ClassDef) else []
    return True


def missing_tests(ledger: Ledger, root: str | pathlib.Path) -> list[str]:
    """The test ids of the ledger that do not name a test under ``root``.

    An id ``path::name`` or ``path::Class::name`` exists when the file ``root/path``
    exists and defines that function, or that class with that method, as read by
    ``ast``; a parametrisation suffix ``[...]`` is ignored.
    """
    root = pathlib.Path(root)
    trees: dict[str, ast.Module | None] = {}
    missing = []
    for node_id in test_ids(ledger):
        file, *names = re.sub(r"\[.*\]$", "", node_id).split("::")
        if file not in trees:
            path = root / file
            trees[file] = ast.parse(path.read_text()) if path.is_file() else None
        tree = trees[file]
        if not names or tree is None or not _defined(tree, names):
            missing.append(node_id)
    return missing


def _link(label: str, labels: Mapping[str, BookLabel] | None) -> str:
    """A MyST cross-reference to ``label`` reading ``Ch. N: title`` (``Ch. N`` for a
    chapter's own label), or the bare label without ``labels``."""
    if labels is None:
        return f"`{label}`"
    target = labels[label]
    number = target.page.split("_")[0]
    if not number.isdigit():
        text = target.title
    elif target.chapter:
        text = f"Ch. {int(number)}"
    else:
        text = f"Ch. {int(number)}: {target.title}"
    if re.search(r"[<>`]", text):  # would end the role's text early
        return f"{{{target.role}}}`{label}`"
    return f"{{{target.role}}}`{text} <{label}>`"


def _links(row: Mapping, labels: Mapping[str, BookLabel] | None) -> str:
    return "; ".join(_link(label, labels) for label in row["chapter"])


def claims_table(
    rows: Sequence[Mapping[str, Any]],
    labels: Mapping[str, BookLabel] | None = None,
) -> str:
    """A Markdown table of claims, three columns: the id, the claim and its place in
    the paper; what the book measured and the sections that show it; the verdict and
    why.

    With ``labels`` (from :func:`book_labels`) the sections are MyST cross-references,
    which the page renders as links (the page's Markdown outputs are parsed as MyST);
    without, the bare labels.
    """
    table = [
        {
            "claim": f"*{row['id']}*: {row['claim']} ({row['where']})",
            "measured": f"{row['measured']} *Shown in* {_links(row, labels)}.",
            "verdict": f"**{row['verdict']}**: {row['why']}",
        }
        for row in rows
    ]
    return markdown_table(
        table,
        ["claim", "measured", "verdict"],
        headers={"claim": "claim (paper)", "measured": "measured in the book"},
    )


def claim_tests(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown list: each claim's id and the tests that assert it."""
    lines = []
    for row in rows:
        tests = ", ".join(f"`{t}`" for t in row["tests"]) or "none"
        lines.append(f"- `{row['id']}`: {tests}")
    return "\n".join(lines) + "\n"


def untested_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of the claims the book does not test, with why."""
    table = [
        {
            "paper": row["paper"],
            "claim": f"{row['claim']} ({row['where']})",
            "why": row["why"],
        }
        for row in rows
    ]
    return markdown_table(
        table,
        ["paper", "claim", "why"],
        headers={"claim": "claim (paper)", "why": "why the book does not test it"},
    )


def departures_table(
    rows: Sequence[Mapping[str, Any]],
    labels: Mapping[str, BookLabel] | None = None,
) -> str:
    """A Markdown table of departures: topic, theirs, ours, and why with the book's
    sections."""
    table = [
        {**row, "why": f"{row['why']} *Shown in* {_links(row, labels)}."}
        for row in rows
    ]
    return markdown_table(
        table,
        ["topic", "theirs", "ours", "why"],
        headers={"theirs": "paper or authors' code", "ours": "the book"},
    )


def verdict_counts(ledger: Ledger) -> list[dict[str, Any]]:
    """Per paper, how many claims have each verdict; the untested claims count as
    ``not tested``.  One row per paper and a total row, keys ``paper`` and the
    verdicts."""
    rows = []
    for paper in (*PAPERS, "total"):
        row: dict[str, Any] = {"paper": paper}
        for verdict in VERDICTS:
            row[verdict] = sum(
                c["verdict"] == verdict and paper in (c["paper"], "total")
                for c in ledger.claims
            )
        row["not tested"] += sum(
            paper in (u["paper"], "total") for u in ledger.untested
        )
        rows.append(row)
    return rows
