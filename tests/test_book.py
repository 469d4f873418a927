"""The book is a test: every chapter in ``_toc.yml`` executes in a fresh kernel.

A chapter's check cells assert the identities it states, so a chapter that runs is a
chapter whose mathematics holds.  ``make book`` executes the same chapters again while
rendering them.
"""

from __future__ import annotations

import pathlib

import jupytext
import nbclient
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A chapter should run in about two minutes on 2 cores; ten is a hang, not slowness.
CELL_TIMEOUT_S = 600


def _toc_files() -> list[str]:
    """Every document listed in ``_toc.yml``, root first, as paths without extension."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part["chapters"])
    walk(toc.get("chapters", []))
    return files


def _chapters() -> list[pathlib.Path]:
    """Documents of the table of contents that are notebooks (they declare a kernel)."""
    paths = [ROOT / f"{name}.md" for name in _toc_files()]
    return [
        p for p in paths if p.exists() and "kernelspec" in jupytext.read(p).metadata
    ]


def test_toc_lists_only_existing_files_and_every_book_page():
    listed = {ROOT / f"{name}.md" for name in _toc_files()}
    missing = sorted(str(p.relative_to(ROOT)) for p in listed if not p.exists())
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"
    orphans = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "book").glob("*.md")
        if p not in listed
    )
    assert not orphans, f"book pages missing from _toc.yml: {orphans}"


def test_there_are_chapters_to_execute():
    assert _chapters(), "no executable chapter found in _toc.yml"


@pytest.mark.book
@pytest.mark.parametrize("path", _chapters(), ids=lambda p: p.stem)
def test_chapter_executes(path: pathlib.Path):
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={
            "metadata": {"path": str(path.parent)}
        },  # run where jupyter-book runs it
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
