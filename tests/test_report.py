"""``markdown_table``: result tables the book renders instead of printing."""

from __future__ import annotations

import pytest

from otattn.report import markdown_table

ROWS = [
    {"method": "goat", "L": 1024, "err": 1.5e-6},
    {"method": "sdpa|mask", "L": 2048, "err": 3.0e-7},
]


def test_markdown_table_has_a_header_a_rule_and_one_line_per_row():
    text = markdown_table(
        ROWS, ["method", "L", "err"], headers={"err": "error"}, formats={"err": ".1e"}
    )
    lines = text.splitlines()
    assert lines[0] == "| method | L | error |"
    assert lines[1] == "|:--|--:|--:|"  # text left, numbers right
    assert lines[2] == "| goat | 1024 | 1.5e-06 |"
    assert lines[3] == "| sdpa\\|mask | 2048 | 3.0e-07 |"  # a pipe is escaped
    assert text.endswith("\n") and len(lines) == 2 + len(ROWS)


def test_markdown_table_takes_a_function_as_format_and_an_alignment():
    text = markdown_table(
        ROWS, ["L"], formats={"L": lambda v: f"{v // 1024}k"}, align={"L": "center"}
    )
    assert text.splitlines()[1:] == ["|:-:|", "| 1k |", "| 2k |"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"columns": []}, "at least one column"),
        ({"columns": ["method", "speed"]}, r"row 0 lacks the columns \['speed'\]"),
        ({"columns": ["L"], "formats": {"err": ".1e"}}, r"formats names .*'err'"),
        ({"columns": ["L"], "align": {"L": "middle"}}, "use one of"),
    ],
)
def test_markdown_table_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        markdown_table(ROWS, **kwargs)


def test_shell_lines_break_before_flags_and_round_trip():
    import shlex

    from otattn.report import shell_lines

    command = "python -m otattn sweep retrieval --variants goat rope --seeds 0 1 2 "
    command += "--data-dir 'book/data/a b' --jobs 2"
    text = shell_lines(command, width=40)
    lines = text.split("\n")
    assert all(len(line) <= 42 for line in lines) and len(lines) > 2
    assert all(line.lstrip().startswith("--") for line in lines[1:])
    assert shlex.split(text.replace("\\\n", " ")) == shlex.split(command)
    assert shell_lines("make test") == "make test"
