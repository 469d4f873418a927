"""The book's Sphinx extension: library code is shown without its docstrings."""

from __future__ import annotations

import ast
import inspect
import pathlib
import sys
import textwrap

import pytest

import otattn.eot
import otattn.spectral

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "book" / "_ext"))
from otattn_book import strip_docstrings  # noqa: E402


def _docstrings(tree: ast.AST) -> list[str]:
    kinds = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module
    return [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]


@pytest.mark.parametrize(
    "obj",
    [otattn.eot.one_sided_plan, otattn.eot.SinkhornResult, otattn.spectral.goat_lanes],
    ids=lambda o: o.__name__,
)
def test_stripping_keeps_every_line_of_code_and_no_docstring(obj):
    source = inspect.getsource(obj)
    stripped = strip_docstrings(source)
    before, after = ast.parse(source), ast.parse(stripped)
    assert any(_docstrings(before)) and not any(_docstrings(after))
    # The code is unchanged once docstrings are removed from both trees.
    for tree in (before, after):
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                if isinstance(getattr(body[0], "value", None), ast.Constant):
                    node.body = body[1:] or [ast.Expr(ast.Constant(...))]
    assert ast.dump(before) == ast.dump(after)


def test_a_method_with_only_a_docstring_keeps_a_body_and_its_indentation():
    source = textwrap.indent(
        'class A:\n    """Doc."""\n\n    def f(self):\n        """Only doc."""\n',
        "    ",
    )
    stripped = strip_docstrings(source)
    assert stripped == "    class A:\n        def f(self):\n            ...\n"
    ast.parse(textwrap.dedent(stripped))
