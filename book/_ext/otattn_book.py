"""Sphinx additions for the otattn book.

``literalinclude`` with ``:pyobject:`` shows library code as the reader should see it:
the code without its docstrings (their prose and mathematics are the chapter's text, and
the API reference page renders them), captioned with the file it comes from.  Add the
flag ``:docstring:`` to keep the docstrings.
"""

from __future__ import annotations

import ast
import os
import textwrap

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.directives.code import LiteralInclude


def strip_docstrings(source: str) -> str:
    """``source`` (a function or class, possibly indented) without its docstrings.

    A body that held only a docstring gets ``...`` in its place, so the code stays
    valid Python.
    """
    tree = ast.parse(textwrap.dedent(source))
    drop: set[int] = set()  # 1-based line numbers to remove
    ellipsis_at: dict[int, int] = {}  # line -> column, for bodies left empty
    blank_after: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(
            node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module
        ):
            continue
        body = node.body
        if not (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            continue
        doc = body[0]
        drop.update(range(doc.lineno, doc.end_lineno + 1))
        if len(body) == 1:
            ellipsis_at[doc.lineno] = doc.col_offset
        else:
            blank_after.add(doc.end_lineno + 1)  # dropped if it is blank
    lines = source.splitlines()
    drop.update(n for n in blank_after if n <= len(lines) and not lines[n - 1].strip())
    # The dedent removed a common prefix; the same line numbers index ``lines``.
    indent = len(lines[0]) - len(lines[0].lstrip()) if lines else 0
    kept = []
    for number, line in enumerate(lines, start=1):
        if number in ellipsis_at:
            kept.append(" " * (indent + ellipsis_at[number]) + "...")
        elif number not in drop:
            kept.append(line)
    return "\n".join(kept) + ("\n" if source.endswith("\n") else "")


class LibraryInclude(LiteralInclude):
    """``literalinclude`` that strips docstrings from ``:pyobject:`` includes and
    captions them with the file's path relative to the book's root."""

    option_spec = {**LiteralInclude.option_spec, "docstring": directives.flag}

    def run(self) -> list[nodes.Node]:
        pyobject = "pyobject" in self.options
        if pyobject and "caption" not in self.options:
            _, path = self.env.relfn2path(self.arguments[0])
            root = self.env.app.srcdir
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            self.options["caption"] = f"{relative}: {self.options['pyobject']}"
        result = super().run()
        if pyobject and "docstring" not in self.options:
            for node in result:
                for block in node.findall(nodes.literal_block):
                    code = strip_docstrings(block.astext())
                    block.children = [nodes.Text(code)]
                    block.rawsource = code
        return result


def setup(app: Sphinx) -> dict:
    app.add_directive("literalinclude", LibraryInclude, override=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
