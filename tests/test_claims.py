"""The claims ledger (``book/data/claims.yaml``) and its checks (``otattn.claims``).

Every test id the ledger names must name a test of this suite, and every chapter
label a label of the book, so a renamed test or section fails here, not silently on
the appendix page.
"""

from __future__ import annotations

import copy
import pathlib

import pytest

from otattn import claims
from otattn.claims import (
    CLAIM_FIELDS,
    VERDICTS,
    BookLabel,
    book_labels,
    chapter_labels,
    check_ledger,
    claim_tests,
    claims_table,
    departures_table,
    load_claims,
    missing_labels,
    missing_tests,
    untested_table,
    verdict_counts,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEDGER = ROOT / "book" / "data" / "claims.yaml"


@pytest.fixture(scope="module")
def ledger():
    return load_claims(LEDGER)


def _claim(**changes) -> dict:
    row = {
        "id": "a-claim",
        "paper": "goat",
        "where": "§2",
        "claim": "Softmax is one-sided EOT.",
        "kind": "theory",
        "measured": "Equal to 1e-12.",
        "chapter": ["ch-softmax-eot"],
        "tests": [
            "tests/test_eot.py::test_plan_equals_softmax_of_negative_cost_over_eps"
        ],
        "verdict": "verified",
        "why": "Proved and tested.",
    }
    row.update(changes)
    return row


def test_every_test_id_in_the_ledger_names_a_test(ledger):
    assert claims.test_ids(ledger), "the ledger names no test"
    assert missing_tests(ledger, ROOT) == []


def test_every_chapter_label_in_the_ledger_is_a_label_of_the_book(ledger):
    labels = book_labels(ROOT / "book")
    for row in (*ledger.claims, *ledger.departures):
        unknown = [label for label in row["chapter"] if label not in labels]
        assert not unknown, (row["id"], unknown)
    assert missing_labels(ledger, ROOT / "book") == []


def test_verdicts_are_in_the_vocabulary_and_ids_are_unique(ledger):
    assert {row["verdict"] for row in ledger.claims} <= set(VERDICTS)
    ids = [row["id"] for rows in vars(ledger).values() for row in rows]
    assert len(ids) == len(set(ids))


def test_every_verified_claim_names_a_test(ledger):
    assert all(row["tests"] for row in ledger.claims if row["verdict"] == "verified")


def test_the_counts_add_up_to_the_rows(ledger):
    counts = verdict_counts(ledger)
    total = counts[-1]
    assert total["paper"] == "total"
    assert sum(total[v] for v in VERDICTS) == len(ledger.claims) + len(ledger.untested)
    for verdict in VERDICTS:
        assert total[verdict] == sum(row[verdict] for row in counts[:-1])


def test_a_bad_verdict_is_refused():
    with pytest.raises(ValueError, match="verdict must be one of .* got 'pending'"):
        check_ledger({"claims": [_claim(verdict="pending")]})


@pytest.mark.parametrize("field", CLAIM_FIELDS)
def test_a_missing_field_is_refused(field):
    row = _claim()
    del row[field]
    with pytest.raises(ValueError, match=rf"missing fields \['{field}'\]"):
        check_ledger([row])


def test_bad_rows_are_refused_with_the_reason():
    cases = {
        "unknown fields": _claim(note="x"),
        "non-empty string": _claim(why="  "),
        "lower-case words": _claim(id="Bad Id"),
        "paper must be one of": _claim(paper="gpt"),
        "kind must be one of": _claim(kind="vibes"),
        "names no label": _claim(chapter=[]),
        "must name the tests": _claim(tests=[]),
        "list of non-empty strings": _claim(tests=[3]),
    }
    for message, row in cases.items():
        with pytest.raises(ValueError, match=message):
            check_ledger([row])
    with pytest.raises(ValueError, match="duplicate id 'a-claim'"):
        untested = {k: _claim()[k] for k in ("id", "paper", "where", "claim", "why")}
        check_ledger({"claims": [_claim()], "untested": [untested]})
    with pytest.raises(ValueError, match="unknown sections"):
        check_ledger({"claims": [], "pending": []})
    with pytest.raises(ValueError, match="expected a mapping"):
        check_ledger("claims")


def test_a_claim_that_is_not_tested_may_name_no_test():
    ledger = check_ledger([_claim(verdict="not tested", tests=[])])
    assert ledger.claims[0]["tests"] == ()
    assert ledger.claims[0]["chapter"] == ("ch-softmax-eot",)


def test_missing_tests_catches_made_up_ids(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "def test_a():\n    pass\n\n\n"
        "class TestB:\n    def test_c(self):\n        pass\n"
    )
    real = [
        "tests/test_x.py::test_a",
        "tests/test_x.py::test_a[p-1]",
        "tests/test_x.py::TestB::test_c",
    ]
    made_up = [
        "tests/test_x.py::test_nope",
        "tests/test_x.py::TestB::test_nope",
        "tests/test_x.py::TestB::test_c::deeper",
        "tests/test_y.py::test_a",
        "tests/test_x.py",
    ]
    ledger = check_ledger([_claim(tests=real + made_up)])
    assert missing_tests(ledger, tmp_path) == sorted(made_up)


def test_book_labels_finds_targets_and_directive_labels(tmp_path):
    (tmp_path / "05_sinks.md").write_text(
        "(ch-sinks)=\n# Attention sinks\n\n(sec-a)=\n\n## A section\n\n"
        ":::{prf:proposition} Collapse to the prior\n:label: prop-collapse\n:::\n\n"
        "```{exercise}\n:label: ex-one\n```\n\n(no-heading)=\nText.\n"
    )
    assert book_labels(tmp_path) == {
        "ch-sinks": BookLabel("05_sinks", "Attention sinks", chapter=True),
        "sec-a": BookLabel("05_sinks", "A section"),
        "prop-collapse": BookLabel("05_sinks", "Collapse to the prior", "prf:ref"),
        "ex-one": BookLabel("05_sinks", "exercise ex-one"),
        "no-heading": BookLabel("05_sinks", "no-heading"),
    }
    (tmp_path / "06_gated.md").write_text("(sec-a)=\n# Again\n")
    with pytest.raises(ValueError, match="'sec-a' is defined in 05_sinks.md"):
        book_labels(tmp_path)


def test_claims_table_has_one_line_per_claim_and_links_the_sections():
    labels = {
        "ch-softmax-eot": BookLabel(
            "01_softmax_is_eot", "Softmax is EOT", chapter=True
        ),
        "sec-a": BookLabel("01_softmax_is_eot", "A section"),
    }
    rows = check_ledger(
        [_claim(chapter=["ch-softmax-eot", "sec-a"]), _claim(id="b", claim="a | b")]
    ).claims
    table = claims_table(rows, labels)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert (
        "*Shown in* {ref}`Ch. 1 <ch-softmax-eot>`; {ref}`Ch. 1: A section <sec-a>`."
        in lines[2]
    )
    assert "a \\| b" in lines[3]  # a pipe in the text does not split the cell
    assert "**verified**: Proved and tested." in lines[2]
    assert "`ch-softmax-eot`" in claims_table(rows)  # no labels: the bare label
    labels = {
        "ch-softmax-eot": BookLabel("01_softmax_is_eot", "A <title>"),
        "prop-softmax": BookLabel("01_softmax_is_eot", "Softmax", "prf:ref"),
    }
    rows = check_ledger([_claim(chapter=["ch-softmax-eot", "prop-softmax"])]).claims
    line = claims_table(rows, labels).splitlines()[2]
    # a title that would end the role early is left out; a proposition is a prf:ref
    assert "{ref}`ch-softmax-eot`; {prf:ref}`Ch. 1: Softmax <prop-softmax>`." in line


def test_the_other_renderings_name_every_row(ledger):
    labels = book_labels(ROOT / "book")
    assert claim_tests(ledger.claims).count("\n- ") == len(ledger.claims) - 1
    assert len(untested_table(ledger.untested).splitlines()) == 2 + len(ledger.untested)
    text = departures_table(ledger.departures, labels)
    assert len(text.splitlines()) == 2 + len(ledger.departures)
    assert all(f"| {row['topic']} |" in text for row in ledger.departures)
    assert set(chapter_labels(ledger)) <= set(labels)


def test_the_ledger_is_not_changed_by_checking_it():
    data = {"claims": [_claim()]}
    before = copy.deepcopy(data)
    check_ledger(data)
    assert data == before
