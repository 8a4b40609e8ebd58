"""TAT-QA conversion: cell cleaning, header parsing, and the oracle on the real dev split (../shared)."""
import json
import os
import sqlite3

import pytest

from data.tatqa import clean_cell, convert, convert_question, parse_table
from env_sql import SQLEnv, load_tasks
from eval import run_oracle, summarize
from tests.conftest import TATQA_DEV


@pytest.mark.parametrize("raw,want", [
    ("$  1,452.4", (1452.4, "num")), ("(3.1)", (-3.1, "num")), ("(35)%", (-35.0, "num")), ("(35%)", (-35.0, "num")),
    ("\u221212.5", (-12.5, "num")), ("1.30 (1)", (1.3, "num")), ("US$ 3,100", (3100.0, "num")), ("£m 4", (None, "text")),
    ("17.7%", (17.7, "num")), ("25 bps", (25.0, "num")), ("3.5x", (3.5, "num")), ("-", (0.0, "dash")),
    ("—", (0.0, "dash")), ("$ —", (0.0, "dash")), ("", (None, "empty")), ("n/a", (None, "text")),
    ("Fixed Price", (None, "text")), ("HK$ (2,000)", (-2000.0, "num")), ("(2,000)", (-2000.0, "num")),
    # the currency outside the parentheses, as 10-K tables print a negative amount: 106 cells of TAT-QA dev
    ("$(1.3)", (-1.3, "num")), ("$ (9,688)", (-9688.0, "num")), ("$(0.08)", (-0.08, "num")), ("\u2015", (0.0, "dash")),
])
def test_clean_cell(raw, want):
    assert clean_cell(raw) == want


def test_parse_table_multirow_header_and_sections():
    rows = [["", "Years Ended September 30,", "", ""], ["", "2019", "2018", "% Change"],
            ["Revenue:", "", "", ""], ["Fixed Price", "$ 1,452.4", "$ 1,146.2", "26.7%"], ["Other", "44.1", "-", "n/a"],
            ["", "$1,496.5", "$1,146.2", ""]]
    cols, data, _ = parse_table(rows)
    assert [c for c, _ in cols] == ["y2019", "y2018", "years_ended_september_30_pct_change"]
    assert [(i, s, item) for i, s, item, _ in data] == [(3, "Revenue", "Fixed Price"), (4, "Revenue", "Other"),
                                                       (5, "Revenue", "(unlabeled total)")]
    assert [v for v, _, _ in data[1][3]] == [44.1, 0.0, None]


def test_parse_table_unit_note_and_year_header():
    rows = [["", "Fiscal Year", "", "Variance in", ""], ["(In millions)", "2019", "2018", "$", "%"], ["Net revenues", "$ 2,456", "$ 2,353", "$ 103", "4 %"]]
    cols, data, notes = parse_table(rows)
    assert [c for c, _ in cols] == ["y2019", "y2018", "variance_in_amount", "variance_in_pct"] and notes == ["(In millions)"]
    assert [(v, k) for v, k, _ in data[0][3]] == [(2456.0, "num"), (2353.0, "num"), (103.0, "num"), (4.0, "num")]


def test_question_conversion_and_drops():
    rows = [["", "2019", "2018"], ["Sales", "100.0", "80.0"], ["Loss", "(5.0)", "(4.0)"]]
    cols, data, _ = parse_table(rows)
    q = lambda **kw: {"answer_from": "table", "answer_type": "arithmetic", "derivation": "", "scale": "", **kw}
    task, why = convert_question(q(answer=25.0, derivation="(100-80)/80", scale="percent"), cols, data)
    assert why is None and task["expr"] == "(({0}-{1})/{2}) * 100" and [c["value"] for c in task["gold_cells"]] == [100.0, 80.0, 80.0]
    task, why = convert_question(q(answer=90.0, derivation="(100+80)/2"), cols, data)
    assert why is None and task["expr"] == "({0}+{1})/2.0"
    assert convert_question(q(answer=1.0, derivation="5-4"), cols, data)[1] == "sign_mismatch"
    assert convert_question(q(answer=7.0, derivation="107-100"), cols, data)[1] == "input_not_in_table"
    assert convert_question(q(answer=30.0, derivation="100-80"), cols, data)[1] == "derivation_mismatch"
    assert convert_question(q(answer_type="count", answer=2), cols, data)[1] == "count"
    assert convert_question(q(answer_from="text", answer=1), cols, data)[1] == "needs_text"
    assert convert_question(q(answer_type="span", answer=["2019"], question="Which year had higher sales?"), cols, data)[1] == "year_answer"


@pytest.fixture(scope="module")
def tatqa_dev(tmp_path_factory):
    if not os.path.exists(TATQA_DEV):
        pytest.skip(f"needs the TAT-QA dev split at {TATQA_DEV} (../shared/data is absent)")
    out = str(tmp_path_factory.mktemp("tatqa"))
    tasks, drops, n_db = convert(TATQA_DEV, out)
    return out, tasks, drops, n_db


def test_tatqa_dev_converts_and_packs(tatqa_dev):
    out, tasks, drops, n_db = tatqa_dev
    assert len(tasks) >= 800 and {t["answer_from"] for t in tasks} == {"table", "table-text"}
    for d in sorted(os.listdir(os.path.join(out, "dbs")))[:-1]:  # the last database holds the remainder
        with SQLEnv(os.path.join(out, "dbs", d)) as env:
            assert 8 <= len(env.tables) <= 12
    conn = sqlite3.connect(os.path.join(out, tasks[0]["db"]))
    assert conn.execute("SELECT COUNT(*) FROM _raw_cells").fetchone()[0] > 0
    assert sum(drops.values()) + len(tasks) == 1668


def test_oracle_on_tatqa_dev(tatqa_dev):
    out = tatqa_dev[0]
    results = run_oracle(load_tasks(os.path.join(out, "tasks.jsonl")))
    rep = summarize(results)
    assert rep["accuracy"] >= 0.97, [r["failure"] for r in results if not r["reward"]][:5]
    # TAT-QA's derivations write their constants as floats ('(a + b + c) / 3.0'): still grounded
    assert rep["rubric"]["ungrounded_answer"] == 0.0, [r["answer"] for r in results if r["rubric"]["ungrounded_answer"]][:5]
