"""Task data: synthetic determinism and accounting checked through SQLite, and the oracle through the tools."""
import json
import os
import sqlite3

import pytest

from data.synth import KINDS, build
from env_sql import load_tasks
from eval import run_oracle, summarize

COMPANIES = 12


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    build(out, seed=3, companies=COMPANIES)
    return out


def dump(path):
    return "\n".join(sqlite3.connect(path).iterdump())


def test_synth_is_deterministic(synth, tmp_path):
    again = str(tmp_path / "again")
    build(again, seed=3, companies=COMPANIES)
    assert open(os.path.join(synth, "tasks.jsonl")).read() == open(os.path.join(again, "tasks.jsonl")).read()
    dbs = sorted(os.listdir(os.path.join(synth, "dbs")))
    assert dbs == sorted(os.listdir(os.path.join(again, "dbs"))) and len(dbs) == COMPANIES
    for d in dbs[:3]:
        assert dump(os.path.join(synth, "dbs", d)) == dump(os.path.join(again, "dbs", d))
    other = str(tmp_path / "other")
    build(other, seed=4, companies=COMPANIES)
    assert open(os.path.join(other, "tasks.jsonl")).read() != open(os.path.join(synth, "tasks.jsonl")).read()


def tables_by_kind(conn):
    desc_to_kind = {v[1]: k for k, v in KINDS.items()}
    return {desc_to_kind[d]: t for t, d in conn.execute("SELECT table_name, description FROM _catalog WHERE column_name = ''")}


def val(conn, table, item, col):
    return conn.execute(f'SELECT "{col}" FROM "{table}" WHERE item = ?', (item,)).fetchone()[0]


def test_accounting_identities_hold_in_sqlite(synth):
    for d in sorted(os.listdir(os.path.join(synth, "dbs"))):
        conn = sqlite3.connect(os.path.join(synth, "dbs", d))
        k = tables_by_kind(conn)
        assert 15 <= len(k) <= 40
        for y in ("y2021", "y2022", "y2023", "y2024"):
            bs, is_ = k["balance_sheet"], k["income_statement"]
            assets = val(conn, bs, "Total assets", y)
            assert assets == pytest.approx(val(conn, bs, "Total liabilities", y) + val(conn, bs, "Total stockholders' equity", y), abs=1e-6)
            assert val(conn, bs, "Other noncurrent liabilities", y) > 0
            rev = val(conn, is_, "Total revenue", y)
            for kind in ("segment_revenue", "geographic_revenue"):
                parts = conn.execute(f'SELECT SUM("{y}") FROM "{k[kind]}" WHERE item != \'Total revenue\'').fetchone()[0]
                assert parts == pytest.approx(rev, abs=1e-6), (d, kind, y)
            ni = val(conn, is_, "Net income", y)
            assert val(conn, k["cash_flow"], "Net income", y) == ni
            assert val(conn, is_, "Income before income taxes", y) - val(conn, is_, "Provision for income taxes", y) == pytest.approx(ni, abs=1e-6)
            assert val(conn, k["income_taxes"], "Total provision for income taxes", y) == val(conn, is_, "Provision for income taxes", y)
            assert val(conn, k["ppe"], "Property, plant and equipment, net", y) == val(conn, bs, "Property, plant and equipment, net", y)
            assert val(conn, k["stock_compensation"], "Total stock-based compensation", y) == val(conn, k["cash_flow"], "Stock-based compensation", y)
            emp = conn.execute(f'SELECT SUM("{y}") FROM "{k["headcount"]}" WHERE item != \'Total employees\'').fetchone()[0]
            assert emp == val(conn, k["headcount"], "Total employees", y)
        for y in ("y2023", "y2024"):
            q = conn.execute(f'SELECT SUM("{y}") FROM "{k["quarterly_revenue"]}" WHERE item LIKE \'Q_\'').fetchone()[0]
            assert q == pytest.approx(val(conn, k["quarterly_revenue"], "Full year", y), abs=1e-6)
            assert val(conn, k["quarterly_revenue"], "Full year", y) == val(conn, k["income_statement"], "Total revenue", y)
        cash = [val(conn, k["balance_sheet"], "Cash and cash equivalents", y) for y in ("y2023", "y2024")]
        assert val(conn, k["cash_flow"], "Net change in cash", "y2024") == pytest.approx(cash[1] - cash[0], abs=1e-6)


def test_tasks_cover_templates_and_split_by_company(synth):
    tasks = [json.loads(line) for line in open(os.path.join(synth, "tasks.jsonl"))]
    templates = {t["template"] for t in tasks}
    assert len(templates) >= 12 and {"single_table", "multi_table"} == {t["kind"] for t in tasks}
    by_split = {}
    for t in tasks:
        by_split.setdefault(t["split"], set()).add(t["company"])
    assert set(by_split) == {"train", "val", "test"}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    assert all(len(t["gold_tables"]) >= 2 for t in tasks if t["kind"] == "multi_table")
    assert len({t["question"] for t in tasks}) > 0.95 * len(tasks)


def test_oracle_solves_every_synthetic_task(synth):
    tasks = load_tasks(os.path.join(synth, "tasks.jsonl"))
    results = run_oracle(tasks)
    rep = summarize(results)
    assert rep["accuracy"] == 1.0, [r["failure"] for r in results if not r["reward"]][:5]
    assert rep["rubric"]["listed_tables_first"] == 1.0 and rep["rubric"]["schema_before_query"] == 1.0
    assert rep["rubric"]["hallucinated"] == 0.0
    assert rep["rubric"]["first_table_right"] == 1.0 and rep["rubric"]["read_gold_tables"] == 1.0
    # every answer is a value read or computed from read values (units changed by 1000 on per-employee questions)
    assert rep["rubric"]["ungrounded_answer"] == 0.0, [r["answer"] for r in results if r["rubric"]["ungrounded_answer"]][:5]


def test_eval_cli_creates_its_output_folders(synth, tmp_path):
    """eval.py --json/--transcripts into folders that do not exist yet: made up front, so a long evaluation never
    ends in a FileNotFoundError with its results unwritten."""
    import subprocess
    import sys
    report, lines = tmp_path / "a" / "b" / "report.json", tmp_path / "c" / "episodes.jsonl"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "eval.py"), "--policy", "oracle", "--tasks",
                    os.path.join(synth, "tasks.jsonl"), "--limit", "3", "--json", str(report), "--transcripts",
                    str(lines)], check=True, capture_output=True, cwd=root)
    assert json.loads(report.read_text())["accuracy"] == 1.0
    assert len(lines.read_text().splitlines()) == 3


def test_eval_kind_filter(synth, tmp_path):
    """eval.py --kind: only that kind's tasks, sampled by --limit after the filter (the synthetic test split holds both
    kinds)."""
    import eval as evaluation
    tasks = [json.loads(l) for l in open(os.path.join(synth, "tasks.jsonl"))]
    for kind in ("multi_table", "single_table"):
        lines = tmp_path / f"{kind}.jsonl"
        evaluation.main(["--policy", "oracle", "--tasks", os.path.join(synth, "tasks.jsonl"), "--split", "test",
                         "--kind", kind, "--limit", "4", "--transcripts", str(lines)])
        kinds = [r["kind"] for r in map(json.loads, lines.read_text().splitlines())]
        assert kinds == [kind] * 4
    assert {t["kind"] for t in tasks if t["split"] == "test"} == {"single_table", "multi_table"}


def test_load_tasks_errors(tmp_path):
    p = tmp_path / "tasks.jsonl"
    p.write_text('{"id": "a", "question": "q", "answer": 1, "db": "missing.db", "kind": "single_table"}\n')
    with pytest.raises(FileNotFoundError, match=r"tasks.jsonl:1: task a names db 'missing.db'"):
        load_tasks(str(p))
    p.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match=r"tasks.jsonl:1: task lacks key\(s\) \['question', 'answer', 'db', 'kind'\]"):
        load_tasks(str(p))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tasks(str(tmp_path / "nope.jsonl"))
