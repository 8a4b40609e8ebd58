"""rLLM's FinQA release converted to tasks: a small data folder written in the release's layout (the per-company table
JSON holds each table as pandas' DataFrame.to_json() writes it, {column: {row: cell}}; the questions are CSV with
rLLM's columns), read back from SQLite itself, with hand-computed derivations and the oracle graded on the dataset's own
answer strings."""
import csv
import json
import os
import sqlite3

import pytest

from data.rllm_finqa import convert
from env_sql import SQLEnv, load_tasks
from eval import run_oracle

REVENUE = "us_gaap_ScheduleOfRevenueTableTextBlock"
TAX = "us_gaap_IncomeTaxTableTextBlock"
FIELDS = ["user_query", "id", "question_type", "question", "answer", "explanation", "company", "table_name",
          "columns_used_json", "rows_used_json"]


def frame(headers, rows):
    """pandas' default DataFrame.to_json(): {column: {"0": cell, "1": cell, ...}}, as a JSON string."""
    return json.dumps({h: {str(i): r[j] for i, r in enumerate(rows)} for j, h in enumerate(headers)})


def question(qid, company, q, answer, table, cols=(), rows=(), qtype="single_table_lookup"):
    return {"user_query": f"For company `{company}`, here is the question: {q}", "id": qid, "question_type": qtype,
            "question": q, "answer": answer, "explanation": "", "company": company,
            "table_name": table if isinstance(table, str) else json.dumps(table),
            "columns_used_json": json.dumps(list(cols)), "rows_used_json": json.dumps(list(rows))}


def write_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("rllm_finqa")
    data, out = root / "data", str(root / "out")
    tables = {
        "acme": {
            REVENUE: {"table": frame(["category", "2023", "2022"],
                                     [["total_net_sales", "$_394,328", "$_365,817"], ["services", "85,200", "78,129"],
                                      ["other_income", "(1,200)", "—"]]),
                      "description": "revenue_by_category_for_fiscal_2023_and_2022", "company": "acme"},
            TAX: {"table": frame(["item", "amount", "notes"],
                                 [["current_tax", "1,500", "see_note_5"], ["deferred_tax", "12.5%", None]]),
                  "description": "income_tax_components", "company": "acme"},
            "us_gaap_EmptyTableTextBlock": {"table": "{}", "description": "nothing", "company": "acme"},
            # two keys that become one SQLite name (and SQLite's names ignore case)
            "segment-data": {"table": frame(["segment", "x"], [["a", "1"]]), "description": "", "company": "acme"},
            "Segment_Data": {"table": frame(["segment", "x"], [["b", "2"]]), "description": "", "company": "acme"},
        },
        "3m": {
            "balance-sheet": {"table": frame(["line item", "FY 2023", "item"],
                                             [["cash", "100", "a"], ["receivables", "250.5", "b"]]),
                              "description": "balance_sheet", "company": "3m"},
            "segments": {"table": frame(["segment", "revenue"], [[f"seg_{i}", str(10 * i)] for i in range(12)]),
                         "description": "segment_revenue", "company": "3m"},
            # a column of one scale word is a number with that unit; one that mixes them stays text
            "debt": {"table": frame(["kind", "fy_2023", "fy_2022"], [["notes", "$_1.5_billion", "$_900_million"],
                                                                   ["loans", "$_2.0_billion", "$_1.1_billion"]]),
                     "description": "debt", "company": "3m"},
        },
        "initech": {
            # two blocks under one header, the second with its own header row; labels repeat; '$(50)' is -50
            "goodwill": {"table": frame(["segment", "2019", "acquisitions"],
                                        [["cloud", "$1,200", "$(50)"], ["devices", "800", "—"], ["total", "$2,000", "$(50)"],
                                         ["(in_millions)", "dec_30,_2017", "acquisitions"], ["cloud", "1,100", "100"],
                                         ["devices", "900", "(20)"], ["total", "$2,000", "80"]]),
                         "description": "goodwill_by_segment", "company": "initech"},
            # '__' is two spaces (rLLM writes a space as '_'): a blank cell, which leaves its column REAL
            "carryforwards": {"table": frame(["kind", "amount", "expires"],
                                             [["federal", "$39,784", "2029"], ["state", "3,313", "__"],
                                              ["foreign", "15,345", "2027"], ["capital_loss", "1,000", "2030"]]),
                              "description": "tax_credit_carryforwards", "company": "initech"},
            "segments": {"table": frame(["segment", "2019", "2018", "2017"], [["cloud", "160", "120", "100"],
                                                                               ["devices", "50", "45", "30"]]),
                         "description": "revenue_by_segment", "company": "initech"},
        },
    }
    for company, meta in tables.items():
        os.makedirs(data / "company_tables" / company)
        with open(data / "company_tables" / company / "tables_cleaned_all_companies.json", "w") as f:
            json.dump(meta, f)
    write_csv(data / "train_finqa.csv", [
        question(0, "acme", "What were total net sales in 2023?", "$394,328 million", REVENUE, ["2023"], ["total_net_sales"]),
        question(1, "acme", "What was the percent change in total net sales from 2022 to 2023?", "7.79%", REVENUE,
                 ["2023", "2022"], ["total_net_sales"]),
        question(2, "acme", "Which category grew faster?", "services grew faster", REVENUE),
        question(3, "acme", "Net sales in each year?", "394,328 in 2023 and 365,817 in 2022", REVENUE),
        question(4, "acme", "Which year had higher services revenue?", "2023", REVENUE, ["2023", "2022"], ["services"]),
        question(5, "globex", "What was revenue?", "5", REVENUE),
        question(6, "acme", "What was revenue?", "5", "us_gaap_NoSuchTableTextBlock"),
        question(7, "acme", "What was other income in 2023?", "-1,200", REVENUE, ["2023"], ["other_income"]),
        question(8, "acme", "What was the deferred tax amount?", "12.5%", TAX, ["amount"], ["deferred_tax"]),
        question(9, "acme", "What was the answer?", "42", REVENUE, ["2023"], ["services"]),
        question(10, "acme", "What were total net sales in 2023, in billions?", "$394.3 billion", REVENUE, ["2023"],
                 ["total_net_sales"]),
    ])
    write_csv(data / "val_finqa.csv", [
        question(0, "3m", "What were cash and receivables together?", "350.5", "balance-sheet", ["FY 2023"],
                 ["cash", "receivables"], qtype="single_table_calculation"),
        # rLLM's rows_used may name a cell of a text column other than the label; its tools find a table by its
        # name in any case, with or without '.json'
        question(1, "3m", "What were receivables (row b)?", "250.5", "Balance-Sheet.json", ["FY 2023"], ["b"]),
        # a repeated label: the answer is in its second row
        question(2, "initech", "What were cloud acquisitions in 2018?", "100", "goodwill", ["acquisitions"], ["cloud"]),
        # rows_used x columns_used names four cells, the answer reads two of them
        question(3, "initech", "What was cloud's 2019 goodwill over devices'?", "1.5", "goodwill", ["2019", "acquisitions"],
                 ["cloud", "devices"]),
        # a three-cell form
        question(4, "initech", "What was the gap between cloud and devices in 2019, as a percent of the total?", "20%",
                 "goodwill", ["2019"], ["cloud", "devices", "total"]),
        # both rows of a repeated label
        question(5, "initech", "By how much did cloud acquisitions change?", "-150", "goodwill", ["acquisitions"], ["cloud"]),
        # the share of a total outside one part: (total - part) / total
        question(6, "initech", "What percent of 2019 goodwill was outside cloud?", "40%", "goodwill", ["2019"],
                 ["total", "cloud"]),
        # three of the four cells rows_used x columns_used names
        question(7, "initech", "What were the tax credit carryforwards, capital losses aside?", "$58,442", "carryforwards",
                 ["amount"], ["federal", "state", "foreign", "capital_loss"]),
        # four cells: the percent change of a sum; three: the change of a two-year average
        question(8, "initech", "By what percent did cloud and devices grow together in 2019?", "27.27%", "segments",
                 ["2019", "2018"], ["cloud", "devices"]),
        question(9, "initech", "How did cloud's 2018-2019 average compare with its 2017-2018 average?", "30", "segments",
                 ["2019", "2018", "2017"], ["cloud"]),
    ])
    write_csv(data / "multi_table_data" / "test_finqa.csv", [
        question(0, "acme", "What was current tax as a percent of 2023 services revenue?", "1.76%", [REVENUE, TAX],
                 ["2023", "amount"], ["services", "current_tax"], qtype="multi_table_ratio"),
    ])
    tasks, drops, n_db = convert(str(data), out)
    return out, {t["id"]: t for t in tasks}, drops, n_db


def test_questions_kept_and_dropped(release):
    out, tasks, drops, n_db = release
    assert sorted(tasks) == ["rllm-finqa-mt-test-0", "rllm-finqa-train-0", "rllm-finqa-train-1", "rllm-finqa-train-10", "rllm-finqa-train-7",
                             "rllm-finqa-train-8", "rllm-finqa-train-9", "rllm-finqa-val-0", "rllm-finqa-val-1", "rllm-finqa-val-2",
                             "rllm-finqa-val-3", "rllm-finqa-val-4", "rllm-finqa-val-5", "rllm-finqa-val-6",
                             "rllm-finqa-val-7", "rllm-finqa-val-8", "rllm-finqa-val-9"]
    assert dict(drops) == {"text_answer": 1, "several_numbers": 1, "year_answer": 1, "company_missing": 1,
                           "table_missing": 1}
    assert n_db == 3 and sorted(os.listdir(os.path.join(out, "dbs"))) == ["acme.db", "c_3m.db", "initech.db"]
    t = tasks["rllm-finqa-train-0"]  # '$394,328 million': 394328 in $ millions
    assert (t["answer"], t["unit"], t["scale"], t["kind"], t["gold_tables"]) == (394328.0, "", 1e6, "single_table", [REVENUE])
    # '$394.3 billion' of a table in millions: restated in the table's units, the scale says how to read 'billion'
    t = tasks["rllm-finqa-train-10"]
    assert (t["answer"], t["scale"], t["answer_text"]) == (pytest.approx(394300.0), pytest.approx(1e6), "$394.3 billion")
    assert tasks["rllm-finqa-train-8"]["unit"] == "%" and tasks["rllm-finqa-mt-test-0"]["kind"] == "multi_table"
    assert tasks["rllm-finqa-mt-test-0"]["gold_tables"] == [REVENUE, TAX]
    assert tasks["rllm-finqa-val-0"]["db"] == "dbs/c_3m.db" and tasks["rllm-finqa-val-0"]["gold_tables"] == ["balance_sheet"]
    assert tasks["rllm-finqa-val-1"]["gold_tables"] == ["balance_sheet"]


def test_tables_in_sqlite(release):
    out = release[0]
    conn = sqlite3.connect(os.path.join(out, "dbs", "acme.db"))
    cols = [(r[1], r[2]) for r in conn.execute(f'PRAGMA table_info("{REVENUE}")')]
    assert cols == [("row_idx", "INTEGER"), ("item", "TEXT"), ("c_2023", "REAL"), ("c_2022", "REAL")]
    assert conn.execute(f'SELECT * FROM "{REVENUE}" ORDER BY row_idx').fetchall() == [
        (0, "total_net_sales", 394328.0, 365817.0), (1, "services", 85200.0, 78129.0), (2, "other_income", -1200.0, 0.0)]
    # a column with a text cell stays TEXT, as written; an empty cell is NULL
    assert [(r[1], r[2]) for r in conn.execute(f'PRAGMA table_info("{TAX}")')][2:] == [("amount", "REAL"), ("notes", "TEXT")]
    assert conn.execute(f'SELECT amount, notes FROM "{TAX}" ORDER BY row_idx').fetchall() == [(1500.0, "see_note_5"), (12.5, None)]
    assert conn.execute("SELECT raw FROM _raw_cells WHERE table_name = ? AND row_idx = 0 AND column_name = 'c_2023'",
                        (REVENUE,)).fetchone() == ("$_394,328",)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    # the empty table is left out, as rLLM leaves it out
    assert names == {REVENUE, TAX, "segment_data", "Segment_Data_2", "_catalog", "_raw_cells"}
    assert conn.execute('SELECT item FROM "Segment_Data_2"').fetchall() == [("b",)]
    conn = sqlite3.connect(os.path.join(out, "dbs", "c_3m.db"))
    # a header that clashes with item is renamed; the catalog keeps what it was
    assert [r[1] for r in conn.execute('PRAGMA table_info("balance_sheet")')] == ["row_idx", "item", "fy_2023", "item_2"]
    assert conn.execute("SELECT description FROM _catalog WHERE table_name = 'balance_sheet' AND column_name = 'fy_2023'"
                        ).fetchone() == ("header: FY 2023",)
    assert [(r[1], r[2]) for r in conn.execute('PRAGMA table_info("debt")')][2:] == [("fy_2023", "REAL"), ("fy_2022", "TEXT")]
    assert conn.execute("SELECT fy_2023, fy_2022 FROM debt ORDER BY row_idx").fetchall() == [
        (1.5, "$_900_million"), (2.0, "$_1.1_billion")]
    assert conn.execute("SELECT unit FROM _catalog WHERE table_name = 'debt' AND column_name = 'fy_2023'").fetchone() == ("billions",)
    # the rows in the frame's index order (0, 1, ..., 10, 11; not as strings sort)
    assert conn.execute("SELECT item FROM segments ORDER BY row_idx").fetchall() == [(f"seg_{i}",) for i in range(12)]
    assert conn.execute("SELECT revenue FROM segments WHERE item = 'seg_11'").fetchone() == (110.0,)
    # a header row inside the table (no number past its label) leaves its columns REAL, its text NULL there (kept in
    # _raw_cells); '$(50)' is -50
    conn = sqlite3.connect(os.path.join(out, "dbs", "initech.db"))
    assert [(r[1], r[2]) for r in conn.execute('PRAGMA table_info("goodwill")')][2:] == [("c_2019", "REAL"), ("acquisitions", "REAL")]
    assert conn.execute("SELECT * FROM goodwill WHERE row_idx IN (0, 3)").fetchall() == [
        (0, "cloud", 1200.0, -50.0), (3, "(in_millions)", None, None)]
    assert conn.execute("SELECT raw FROM _raw_cells WHERE table_name = 'goodwill' AND row_idx = 3 ORDER BY column_name"
                        ).fetchall() == [("acquisitions",), ("dec_30,_2017",)]
    assert [(r[1], r[2]) for r in conn.execute('PRAGMA table_info("carryforwards")')][2:] == [("amount", "REAL"),
                                                                                              ("expires", "REAL")]
    assert conn.execute("SELECT expires FROM carryforwards ORDER BY row_idx").fetchall() == [
        (2029.0,), (None,), (2027.0,), (2030.0,)]
    with SQLEnv(os.path.join(out, "dbs", "acme.db")) as env:
        listing = env.call("get_table_names", {})
    assert f"{REVENUE}: revenue by category for fiscal 2023 and 2022" in listing and "Empty" not in listing


def test_derivations(release):
    tasks = release[1]
    want = {  # (expr, [(column, row label)]) worked out by hand from the fixture's cells
        "rllm-finqa-train-0": ("{0}", [("c_2023", "total_net_sales")]),
        "rllm-finqa-train-1": ("({0} - {1}) / {1} * 100", [("c_2023", "total_net_sales"), ("c_2022", "total_net_sales")]),
        "rllm-finqa-train-7": ("{0}", [("c_2023", "other_income")]),
        "rllm-finqa-train-8": ("{0}", [("amount", "deferred_tax")]),
        "rllm-finqa-train-10": ("{0}", [("c_2023", "total_net_sales")]),
        "rllm-finqa-val-0": ("{0} + {1}", [("fy_2023", "cash"), ("fy_2023", "receivables")]),
        "rllm-finqa-val-1": ("{0}", [("fy_2023", "receivables")]),
        "rllm-finqa-mt-test-0": ("{1} / {0} * 100", [("c_2023", "services"), ("amount", "current_tax")]),
    }
    for tid, (expr, cells) in want.items():
        assert (tasks[tid]["expr"], [(c["column"], c["item"]) for c in tasks[tid]["gold_cells"]]) == (expr, cells), tid
    want_rows = {  # goodwill's labels repeat: (expr, [(column, row_idx)])
        "rllm-finqa-val-2": ("{0}", [("acquisitions", 4)]),
        "rllm-finqa-val-3": ("{0} / {1}", [("c_2019", 0), ("c_2019", 1)]),
        "rllm-finqa-val-4": ("({0} - {1}) / {2} * 100", [("c_2019", 0), ("c_2019", 1), ("c_2019", 2)]),
        "rllm-finqa-val-5": ("{0} - {1}", [("acquisitions", 0), ("acquisitions", 4)]),
        "rllm-finqa-val-6": ("({0} - {1}) / {0} * 100", [("c_2019", 2), ("c_2019", 0)]),
        "rllm-finqa-val-7": ("{0} + {1} + {2}", [("amount", 0), ("amount", 1), ("amount", 2)]),
        "rllm-finqa-val-8": ("(({0} + {1}) - ({2} + {3})) / ({2} + {3}) * 100",
                             [("c_2019", 0), ("c_2019", 1), ("c_2018", 0), ("c_2018", 1)]),
        "rllm-finqa-val-9": ("({0} + {1}) / 2 - ({1} + {2}) / 2", [("c_2019", 0), ("c_2018", 0), ("c_2017", 0)]),
    }
    for tid, (expr, cells) in want_rows.items():
        assert (tasks[tid]["expr"], [(c["column"], c["row_idx"]) for c in tasks[tid]["gold_cells"]]) == (expr, cells), tid
    assert "expr" not in tasks["rllm-finqa-train-9"] and "gold_cells" not in tasks["rllm-finqa-train-9"]  # 42 is no form of 85,200


def test_oracle_solves_the_derived_tasks(release):
    out = release[0]
    tasks = [t for t in load_tasks(os.path.join(out, "tasks.jsonl")) if "expr" in t]
    results = run_oracle(tasks)
    assert len(results) == 16 and all(r["reward"] == 1 for r in results), [r["failure"] for r in results]


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_finqa.csv"):
        convert(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "train_finqa.csv").write_text("id,company,answer\n0,acme,5\n")
    with pytest.raises(FileNotFoundError, match="company_tables"):
        convert(str(tmp_path), str(tmp_path / "out"))
    os.makedirs(tmp_path / "company_tables")
    with pytest.raises(ValueError, match=r"train_finqa.csv: not an rLLM finqa question file .*table_name"):
        convert(str(tmp_path), str(tmp_path / "out"))


def test_warm_start_clones_only_derived_tasks(release):
    """The warm start draws its demonstrations from the tasks with a derivation; with none, the run stops at once
    with an error that names the way out, not with a KeyError mid-run."""
    import random

    from model import load_tokenizer
    from train_grpo import get_args, select_tasks, warm_start_batch
    path = os.path.join(release[0], "tasks.jsonl")
    args = get_args(["--tasks", path, "--sft-batch", "8", "--wandb", "off"])
    train, _ = select_tasks(load_tasks(path), args)
    assert len(train) == 6 and sum("expr" in t for t in train) == 5  # rllm-finqa-train-9 has none
    cache = {}
    eps = warm_start_batch(load_tokenizer("smollm2-135m"), train, cache, random.Random(0), args)
    assert len(eps) == 5 and sorted(k[0] for k in cache) == ["rllm-finqa-train-0", "rllm-finqa-train-1", "rllm-finqa-train-10",
                                                             "rllm-finqa-train-7", "rllm-finqa-train-8"]
    with pytest.raises(SystemExit, match="no training task .* has an oracle derivation .* --sft-steps 0"):
        select_tasks([t for t in load_tasks(path) if "expr" not in t], args)


def test_tatqa_dev_in_rllm_format(tmp_path):
    """Real 10-K tables at scale: TAT-QA dev's tables written as rLLM's release writes its tables (a frame per table, the
    raw cell text: '$  1,452.4', '(3.1)', '—', '- - %', dates, footnotes) and its 856 questions that data.tatqa keeps
    written as rLLM's CSV (answers as text with their scale word, rows_used / columns_used from TAT-QA's gold cells),
    ten tables per company. Every question is kept; the oracle is graded correct on every derivation found; those
    derivations read TAT-QA's own gold cells (the reference: its annotated derivations), bar one equal value.
    Derivations are found for 838 of 856. Of the other 18: 7 are this test's doing (TAT-QA's gold lists one cell for two
    equal values, and rows_used x columns_used is built from it here: '21.0% - 21.0%' names one cell); 6 read a column
    whose cells are not all numbers ('2.978,478', a title row with a number in it), which stays TEXT; 3 need forms
    over four or more cells; one is 1 / x, one averages three cells over five years."""
    from data.tatqa import convert_question, parse_table
    from tests.conftest import TATQA_DEV
    if not os.path.exists(TATQA_DEV):
        pytest.skip(f"needs the TAT-QA dev split at {TATQA_DEV} (../shared/data is absent)")
    with open(TATQA_DEV) as f:
        contexts = json.load(f)
    data, questions, gold = tmp_path / "data", [], {}
    for ci, ctx in enumerate(contexts):
        company = f"co{ci // 10:02d}"
        columns, rows, _ = parse_table(ctx["table"]["table"])
        headers = ["item"] + [c for c, _ in columns]
        table = [[item] + [raw for _, _, raw in cells] for _, _, item, cells in rows]
        folder = data / "company_tables" / company
        os.makedirs(folder, exist_ok=True)
        path = folder / "tables_cleaned_all_companies.json"
        meta = json.loads(path.read_text()) if path.exists() else {}
        meta[f"table_{ci}"] = {"table": frame(headers, table), "description": "a_table", "company": company}
        path.write_text(json.dumps(meta))
        for q in ctx["questions"]:
            fields, why = convert_question(q, columns, rows)
            if why:
                continue
            a, scale = fields["answer"], q.get("scale", "")
            text = f"{a}%" if scale == "percent" else f"${a:,} {scale}" if scale else f"{a}"
            cells = fields["gold_cells"]
            gold[len(questions)] = {c["value"] for c in cells}
            questions.append(question(len(questions), company, q["question"], text, f"table_{ci}",
                                      dict.fromkeys(c["column"] for c in cells), dict.fromkeys(c["item"] for c in cells)))
    write_csv(data / "test_finqa.csv", questions)
    tasks, drops, n_db = convert(str(data), str(tmp_path / "out"))
    assert len(tasks) == len(questions) == 856 and not drops and n_db == 28
    derived = [t for t in load_tasks(str(tmp_path / "out" / "tasks.jsonl")) if "expr" in t]
    # a regression shows here. Each alone: 797 without header rows inside a table (build_table's heading), 797 without
    # the reading of a repeated label's every row, 806 without forms over pairs of a reading's cells, 823 without them
    # over its triples, 816 without the three-cell forms, 824 without a * b; 697 of 850 without reading '$(1.3)' as
    # -1.3 (data.tatqa.clean_cell); before that, 694 without no_value(), 626 also without the 2-cell mean
    # 830 with at most 6 cells per reading (MAX_CELLS), 831 without the share forms ((a - b) / a), 829 without sums and
    # means of three or more cells, 831 reading '__' as text (each of those four measured before the next two); 836
    # without the change of an average over three cells, 834 without the four-cell forms
    assert len(derived) >= 838
    results = run_oracle(derived)
    assert all(r["reward"] == 1 for r in results), [r["failure"] for r in results if not r["reward"]][:5]
    off = [t["id"] for t in derived if not {c["value"] for c in t["gold_cells"]} <= gold[int(t["id"].split("-")[-1])]]
    # one of 838: 113.6 / 204.9 asked, 1,493 / 2,693 found, the same 55.44% from the table's other unit. Without the
    # relative-only tolerance for restated answers, two more: '$6.33 million' matched a 0 as 0.00633 billion
    assert len(off) <= 1, off


def test_training_mixes_task_files(release, tmp_path):
    """train_grpo.py --tasks a.jsonl b.jsonl: each task's database resolves against its own file's folder, the splits
    and kinds filter the union, and an id in two files is refused (per-task statistics key on it)."""
    import shutil

    from env_sql import load_task_files
    from train_grpo import get_args, select_tasks
    path, other = os.path.join(release[0], "tasks.jsonl"), tmp_path / "other"
    shutil.copytree(os.path.join(release[0], "dbs"), other / "dbs")
    with open(path) as f, open(other / "tasks.jsonl", "w") as g:
        for line in f:
            g.write(json.dumps({**json.loads(line), "id": "copy-" + json.loads(line)["id"]}) + "\n")
    tasks = load_task_files([path, str(other / "tasks.jsonl")])
    n = len(load_tasks(path))
    assert len(tasks) == 2 * n and {os.path.dirname(os.path.dirname(t["db_path"])) for t in tasks} == {
        os.path.abspath(release[0]), str(other)}
    train, _ = select_tasks(tasks, get_args(["--tasks", path, str(other / "tasks.jsonl")]))
    assert len(train) == 12 and sum(t["id"].startswith("copy-") for t in train) == 6
    with pytest.raises(ValueError, match=r"'rllm-finqa-train-0' is in both .*tasks.jsonl and .*tasks.jsonl"):
        load_task_files([path, path])
