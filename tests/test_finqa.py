"""FinQA converted to tasks: examples written in FinQA's published format (pre_text, table, post_text, id, filename, qa
with program, gold_inds and exe_ans), with every exe_ans worked out by hand from the program as FinQA's evaluator
executes it. The tables are read back from SQLite, the expressions compared with hand-written ones, and the oracle is
graded against exe_ans."""
import json
import os
import sqlite3

import pytest

from data.finqa import convert, finqa_cell
from data.tatqa import clean_cell
from env_sql import load_tasks
from eval import run_oracle

ADI = [["( in millions )", "2009", "2008", "2007"],
       ["net revenue", "$ 5829", "$ 5735", "$ 5500"],
       ["other income", "-4 ( 4 )", "$ 12", "( 6 )"],
       ["gross margin", "26.5% ( 26.5 % )", "25.0% ( 25.0 % )", "24.0% ( 24.0 % )"]]
JPM = [["", "2010", "2009"], ["loans", "$ 692.9", "$ 633.5"], ["deposits", "930.4", "938.4"]]


def example(eid, table, question, program, exe_ans, answer, inds=("table_1",), filename=None, pre=None):
    return {"pre_text": pre or ["net revenue rose in 2009 .", "the following table sets forth net revenue by year ( in millions ) :"],
            "post_text": ["no other changes ."], "filename": filename or eid.rsplit("-", 1)[0], "table_ori": table,
            "table": table, "id": eid,
            "qa": {"question": question, "answer": answer, "explanation": "", "program": program, "exe_ans": exe_ans,
                   "gold_inds": {k: "..." for k in inds}, "program_re": ""}}


@pytest.fixture(scope="module")
def finqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("finqa")
    p = "ADI/2009/page_49.pdf"
    examples = [
        example(f"{p}-1", ADI, "what was the percentage change in net revenue from 2008 to 2009?",
                "subtract(5829, 5735), divide(#0, 5735)", 0.01639, "1.6%"),  # 94 / 5735 = 0.0163906
        example(f"{p}-2", ADI, "what was the average net revenue from 2007 to 2009?",
                "table_average(net revenue, none)", 5688.0, "5688"),  # (5829 + 5735 + 5500) / 3
        example(f"{p}-3", ADI, "what was other income in 2009 and 2007 combined?", "add(-4, -6)", -10.0, "-10"),
        example(f"{p}-4", ADI, "what was the 2009 gross margin as a decimal?", "multiply(26.5%, const_1)", 0.265, "0.265"),
        example(f"{p}-5", ADI, "what was the percentage change in net revenue, in percent?",
                "subtract(5829, 5735), divide(#0, 5735), multiply(#1, const_100)", 1.63906, "1.64%"),
        example(f"{p}-6", ADI, "was net revenue higher in 2009 than in 2008?", "greater(5829, 5735)", "yes", "yes"),
        example(f"{p}-7", ADI, "what share of revenue came from the new segment?", "divide(100, 5829)", 0.01716, "1.7%",
                inds=("text_1", "table_1")),
        example(f"{p}-8", ADI, "what is net revenue less the acquisition?", "subtract(5829, 1234)", 4595.0, "4595"),
        example(f"{p}-9", ADI, "what is net revenue plus other income?", "add(5829, 4)", 5833.0, "5833"),  # the cell is -4
        example(f"{p}-10", ADI, "what was the change in net revenue?", "subtract(5829, 5735)", 100.0, "100"),  # it is 94
        example("JPM/2010/page_20.pdf-1", JPM, "what were the largest loans?", "table_max(loans, none)", 692.9, "692.9",
                pre=["the following table presents loans and deposits ( in billions ) :"]),
        example("JPM/2010/page_20.pdf-2", JPM, "what were deposits on average, as half their sum?",
                "table_sum(deposits, none), divide(#0, const_2)", 934.4, "934.4",  # (930.4 + 938.4) / 2
                pre=["the following table presents loans and deposits ( in billions ) :"]),
        example("JPM/2011/page_31.pdf-1", JPM, "what were loans less deposits in 2009?", "subtract(633.5, 938.4)", -304.9,
                "-304.9", pre=["the following table presents loans and deposits :"]),
    ]
    path = root / "train.json"
    path.write_text(json.dumps(examples))
    out = str(root / "out")
    tasks, drops, n_db = convert(str(path), out)
    return out, {t["id"]: t for t in tasks}, drops, n_db


@pytest.mark.parametrize("raw,want", [("-4 ( 4 )", -4.0), ("26.5% ( 26.5 % )", 26.5), ("( 6 )", -6.0), ("$ ( 4 )", -4.0),
                                      ("$ 5829", 5829.0), ("- ( 1 )", 0.0)])
def test_finqa_cell(raw, want):
    """A number repeated in parentheses is read from its first part; a currency sign before a parenthesized number is
    no number, so the whole cell is read (a negative, as '$(1.3)' prints one)."""
    assert clean_cell(finqa_cell(raw))[0] == want


def test_questions_kept_and_dropped(finqa):
    out, tasks, drops, n_db = finqa
    p = "finqa-ADI/2009/page_49.pdf"
    assert sorted(tasks) == sorted([f"{p}-1", f"{p}-2", f"{p}-3", f"{p}-4", f"{p}-5", "finqa-JPM/2010/page_20.pdf-1",
                                    "finqa-JPM/2010/page_20.pdf-2", "finqa-JPM/2011/page_31.pdf-1"])
    assert dict(drops) == {"yes_no": 1, "needs_text": 1, "input_not_in_table": 1, "sign_mismatch": 1,
                           "program_mismatch": 1}
    assert n_db == 2 and sorted(os.listdir(os.path.join(out, "dbs"))) == ["finqa_train_adi.db", "finqa_train_jpm.db"]
    # '1.6%' for exe_ans 0.01639: graded in percent; '1.64%' for a program that multiplies by 100 itself: as it is
    assert (tasks[f"{p}-1"]["answer"], tasks[f"{p}-1"]["unit"]) == (pytest.approx(1.639), "%")
    assert (tasks[f"{p}-5"]["answer"], tasks[f"{p}-5"]["unit"]) == (pytest.approx(1.63906), "%")
    assert (tasks[f"{p}-2"]["unit"], tasks[f"{p}-2"]["scale"]) == ("", 1e6)  # the table's '( in millions )'


def test_tables_in_sqlite(finqa):
    out = finqa[0]
    conn = sqlite3.connect(os.path.join(out, "dbs", "finqa_train_adi.db"))
    assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_%' ESCAPE '\\'"
                        ).fetchall() == [("net_revenue_by_year",)]
    assert conn.execute("SELECT item, y2009, y2008, y2007 FROM net_revenue_by_year ORDER BY row_idx").fetchall() == [
        ("net revenue", 5829.0, 5735.0, 5500.0), ("other income", -4.0, 12.0, -6.0), ("gross margin", 26.5, 25.0, 24.0)]
    desc, unit = conn.execute("SELECT description, unit FROM _catalog WHERE table_name = 'net_revenue_by_year' AND "
                              "column_name = ''").fetchone()
    assert desc.endswith("(2009 annual report, page 49)") and "sets forth net revenue" in desc and unit == "$ millions"
    assert conn.execute("SELECT raw FROM _raw_cells WHERE column_name = 'y2009' ORDER BY row_idx").fetchall() == [
        ("$ 5829",), ("-4 ( 4 )",), ("26.5% ( 26.5 % )",)]
    conn = sqlite3.connect(os.path.join(out, "dbs", "finqa_train_jpm.db"))  # two pages of one company, one database
    assert sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")) == [
        "_catalog", "_raw_cells", "loans_and_deposits", "loans_and_deposits_2"]


def test_programs_become_expressions(finqa):
    tasks = finqa[1]
    p = "finqa-ADI/2009/page_49.pdf"
    want = {  # (expr, [(item, column)]) worked out by hand from the programs
        f"{p}-1": ("(({0} - {1}) / {2}) * 100", [("net revenue", "y2009"), ("net revenue", "y2008"), ("net revenue", "y2008")]),
        f"{p}-2": ("({0} + {1} + {2}) / 3", [("net revenue", "y2009"), ("net revenue", "y2008"), ("net revenue", "y2007")]),
        f"{p}-3": ("{0} + {1}", [("other income", "y2009"), ("other income", "y2007")]),
        f"{p}-4": ("({0} / 100) * 1.0", [("gross margin", "y2009")]),
        f"{p}-5": ("(({0} - {1}) / {2}) * 100.0", [("net revenue", "y2009"), ("net revenue", "y2008"), ("net revenue", "y2008")]),
        "finqa-JPM/2010/page_20.pdf-1": ("max({0}, {1})", [("loans", "y2010"), ("loans", "y2009")]),
        "finqa-JPM/2010/page_20.pdf-2": ("({0} + {1}) / 2.0", [("deposits", "y2010"), ("deposits", "y2009")]),
        "finqa-JPM/2011/page_31.pdf-1": ("{0} - {1}", [("loans", "y2009"), ("deposits", "y2009")]),
    }
    for tid, (expr, cells) in want.items():
        assert (tasks[tid]["expr"], [(c["item"], c["column"]) for c in tasks[tid]["gold_cells"]]) == (expr, cells), tid
    assert tasks["finqa-JPM/2011/page_31.pdf-1"]["gold_tables"] == ["loans_and_deposits_2"]


def test_oracle_is_graded_right_against_exe_ans(finqa):
    results = run_oracle(load_tasks(os.path.join(finqa[0], "tasks.jsonl")))
    assert len(results) == 8 and all(r["reward"] == 1 for r in results), [r["failure"] for r in results]


def test_bad_input(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match=r"dev.json: expected FinQA JSON"):
        convert(str(path), str(tmp_path / "out"))


def test_eval_and_train_name_the_splits_a_task_file_has(finqa, tmp_path):
    """A converted split file holds one split (train here; a dev file 'val'), and eval.py evaluates 'test' unless told
    (train_grpo.py trains on 'train'): the errors name the splits there are, before any model is loaded."""
    import eval as evaluation
    with pytest.raises(SystemExit, match=r"with split 'test' \(it has: train; pass --split\)"):
        evaluation.main(["--tasks", os.path.join(finqa[0], "tasks.jsonl"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"no multi_table tasks in .*tasks.jsonl \[train\] \(it has: single_table; pass --kind\)"):
        evaluation.main(["--tasks", os.path.join(finqa[0], "tasks.jsonl"), "--split", "train", "--kind", "multi_table"])

    from train_grpo import get_args, select_tasks
    with pytest.raises(SystemExit, match=r"no tasks with split 'val' .* \(it has split/kind: train/single_table; see"):
        select_tasks(load_tasks(os.path.join(finqa[0], "tasks.jsonl")), get_args(["--train-split", "val"]))


def finqa_program(derivation):
    """A TAT-QA derivation ('(2703+958)/23406', cleaned by data.tatqa.derivation_numbers) as a FinQA program
    ('add(2703, 958), divide(#0, 23406)'), or None where it holds anything but numbers and + - * /."""
    import ast
    ops, steps = {ast.Add: "add", ast.Sub: "subtract", ast.Mult: "multiply", ast.Div: "divide"}, []

    def walk(n):
        if isinstance(n, ast.Constant):
            return repr(n.value)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant):
            return "-" + walk(n.operand)
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            a, b = walk(n.left), walk(n.right)
            steps.append(f"{ops[type(n.op)]}({a}, {b})")
            return f"#{len(steps) - 1}"
        raise ValueError(ast.dump(n))
    try:
        walk(ast.parse(derivation.strip(), mode="eval").body)
    except (SyntaxError, ValueError):
        return None
    return ", ".join(steps) or None


def test_tatqa_dev_in_finqa_format(tmp_path):
    """Real 10-K tables at scale: TAT-QA dev's arithmetic questions that data.tatqa keeps, written as FinQA examples
    (the raw TAT-QA table rows as FinQA's table, its paragraphs as pre_text, its derivation as a FinQA program, the
    program's value as exe_ans, a table-text question's supporting facts with a text row), ten pages a company. Every
    table-only question is kept and every table-text one dropped as needing text; the oracle is graded correct on all;
    every expression reads only cells of TAT-QA's own derivation (the reference: its annotation)."""
    import ast

    from data.tatqa import convert_question, derivation_numbers, parse_table
    from tests.conftest import TATQA_DEV
    if not os.path.exists(TATQA_DEV):
        pytest.skip(f"needs the TAT-QA dev split at {TATQA_DEV} (../shared/data is absent)")
    with open(TATQA_DEV) as f:
        contexts = json.load(f)
    examples, gold = [], {}
    for ci, ctx in enumerate(contexts):
        columns, rows, _ = parse_table(ctx["table"]["table"])
        for q in ctx["questions"]:
            fields, why = convert_question(q, columns, rows)
            program = None if why or q["answer_type"] != "arithmetic" else finqa_program(derivation_numbers(q["derivation"])[1])
            if program is None:
                continue
            value = eval(compile(ast.parse(derivation_numbers(q["derivation"])[1].strip(), mode="eval"), "", "eval"))
            eid = f"CO{ci // 10:02d}/2019/page_{ci}.pdf-{q['order']}"
            gold[f"finqa-{eid}"] = {c["value"] for c in fields["gold_cells"]}
            inds = ("table_1", "text_1") if q["answer_from"] == "table-text" else ("table_1",)
            answer = f"{fields['answer']}%" if q.get("scale") == "percent" else str(fields["answer"])
            examples.append(example(eid, ctx["table"]["table"], q["question"], program, round(value, 5), answer, inds,
                                    pre=[p["text"] for p in ctx["paragraphs"]]))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(examples))
    tasks, drops, n_db = convert(str(path), str(tmp_path / "out"))
    table_only = sum(len(e["qa"]["gold_inds"]) == 1 for e in examples)
    assert (len(examples), len(tasks), table_only, dict(drops), n_db) == (618, 437, 437, {"needs_text": 181}, 28)
    results = run_oracle(load_tasks(str(tmp_path / "out" / "tasks.jsonl")))
    assert all(r["reward"] == 1 for r in results), [r["failure"] for r in results if not r["reward"]][:5]
    assert [t["id"] for t in tasks if not {c["value"] for c in t["gold_cells"]} <= gold[t["id"]]] == []
