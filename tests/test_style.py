"""Code fits the page: ruff's formatter and linter pass on the library, the tests and
the code cells of every chapter (88 columns, the width of the book's text column).

The configuration is ``[tool.ruff]`` in ``pyproject.toml``.  To fix what these tests
report: ``ruff format src tests`` for the library, and for a chapter
``jupytext --pipe "ruff format -" book/NN_slug.md``; long comments and strings are
wrapped by hand.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jupytext
import pytest
from test_book import _chapters

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"
# A chapter is a script run top to bottom, so imports may follow code (E402), and a
# short lambda can name a small plotting helper (E731).
CHAPTER_IGNORES = "E402,E731"


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--config", str(CONFIG)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_library_and_tests_are_formatted():
    result = _ruff("format", "--check", "src", "tests", "book/_ext")
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_and_tests_pass_the_linter():
    result = _ruff("check", "--output-format", "concise", "src", "tests", "book/_ext")
    assert result.returncode == 0, result.stdout + result.stderr


def _code_sources(notebook) -> list[str]:
    return [c.source.strip("\n") for c in notebook.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", _chapters(), ids=lambda p: p.stem)
def test_chapter_code_is_formatted(path):
    """What ``jupytext --pipe "ruff format -"`` would change: nothing."""
    notebook = jupytext.read(path)
    script = jupytext.writes(notebook, fmt="py:percent")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--config", str(CONFIG), "-"],
        input=script,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    formatted = jupytext.reads(result.stdout, fmt="py:percent")
    unformatted = [
        before
        for before, after in zip(_code_sources(notebook), _code_sources(formatted))
        if before != after
    ]
    assert not unformatted, (
        f"{len(unformatted)} code cells of {path.name} are not formatted; run\n"
        f'  jupytext --pipe "ruff format -" book/{path.name}\n'
        "first of them:\n" + unformatted[0]
    )


@pytest.mark.parametrize("path", _chapters(), ids=lambda p: p.stem)
def test_chapter_code_passes_the_linter(path, tmp_path):
    """The code cells only, in order (the markdown is prose, not code)."""
    script = tmp_path / f"{path.stem}.py"
    cells = _code_sources(jupytext.read(path))
    script.write_text("\n\n".join(f"# %%\n{cell}" for cell in cells) + "\n")
    linted = _ruff(
        "check",
        "--output-format",
        "concise",
        "--extend-ignore",
        CHAPTER_IGNORES,
        str(script),
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr
