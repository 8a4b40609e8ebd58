"""
Convert FinQA (Chen et al., EMNLP 2021; github.com/czyssrs/FinQA, dataset/{train,dev,test}.json) into SQL tasks in the
tablerl format.

    python -m data.finqa --input FinQA/dataset/dev.json --out data/generated/finqa_dev

Each FinQA example is one question over one 10-K page (pre_text, table, post_text) with its reasoning program
("subtract(5829, 5735), divide(#0, 5735)") and the program's result (exe_ans). The pages of one company become the
tables of one SQLite database, so finding the right page among the company's is part of the task. Tables take the
TAT-QA converter's layout (data/tatqa.py): row_idx, section, item, then one REAL column per value column (y2009 where
the header is a year). A FinQA cell that repeats its number in parentheses ("-4 ( 4 )", "26.5% ( 26.5 % )") is read
from the part before them, as FinQA's own evaluator reads table rows. Every raw cell is kept in _raw_cells; _catalog
holds each table's description (the page's caption sentence, the report and page) and its unit note.

Kept: questions whose supporting facts (gold_inds) are all table rows and whose program turns into an expression over
table cells that reproduces exe_ans: each number of the program must be a cell (a number written with % is a percent
cell / 100), constants (const_100, const_m1) stay literals, table_sum / table_average / table_max / table_min read the
named row. A percent answer ("1.6%" for exe_ans 0.01639) is graded in percent. Dropped, with counts per reason
printed: questions that need the text, yes/no (greater) questions, numbers not in the table (or only up to their sign),
and programs that do not reproduce exe_ans.
"""
import argparse
import json
import os
import re
import sys
from collections import Counter, defaultdict

import sqlite_utils

from data.tatqa import CONSTANTS, clean_cell, find_cell, insert_table, parse_table, snake, unique_table_name, write_metadata, write_tasks
from env_sql import calculate

OPS = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/", "exp": "**"}
TABLE_OPS = {"table_sum", "table_average", "table_max", "table_min"}
UNIT_NOTE = re.compile(r"\bin (thousands|millions|billions)\b", re.I)
SCALES = {"thousands": 1e3, "millions": 1e6, "billions": 1e9}
STEP = re.compile(r"\s*(\w+)\(\s*([^,()]*?)\s*,\s*([^,()]*?)\s*\)\s*(?:,|$)")


def finqa_cell(raw):
    """FinQA repeats a number in parentheses ('-4 ( 4 )', '26.5% ( 26.5 % )'): the part before them, as FinQA's evaluator
    reads it; a cell whose part before them is no number ('( 4 )', '$ ( 4 )') is left to clean_cell, which reads it as
    -4."""
    head = str(raw).split("(")[0].strip()
    return head if "(" in str(raw) and clean_cell(head)[1] in ("num", "dash") else str(raw)


def parse_program(program):
    """'subtract(5829, 5735), divide(#0, 5735)' -> [(op, arg1, arg2)], or None if it is not a chain of such steps."""
    steps, pos = [], 0
    while pos < len(program):
        m = STEP.match(program, pos)
        if not m:
            return None
        steps.append(m.groups())
        pos = m.end()
    return steps or None


def program_expr(steps, columns, data):
    """-> (expr with {i} placeholders, the cells they stand for) or (None, drop reason)."""
    cells, done = [], []  # done: each step's expression, for #k

    def cell_slot(c):
        cells.append(c)
        return "{%d}" % (len(cells) - 1)

    def arg(a):
        if a.startswith("#"):
            k = int(a[1:])
            return (None, "bad_program") if k >= len(done) else (f"({done[k]})", None)
        if a.startswith("const_"):
            v = a[len("const_"):]
            return ("-1", None) if v == "m1" else (repr(float(v)), None) if re.fullmatch(r"\d+(\.\d+)?", v) else (None, "bad_program")
        pct = a.endswith("%")
        try:
            v = float(a.rstrip("%").replace(",", ""))
        except ValueError:
            return None, "bad_program"
        hit, c = find_cell(v, columns, data)
        if hit == "exact":
            return (f"({cell_slot(c)} / 100)" if pct else cell_slot(c)), None
        if hit is None and not pct and v in CONSTANTS:
            return repr(v), None
        return None, "input_not_in_table" if hit is None else "sign_mismatch"

    for op, a1, a2 in steps:
        if op == "greater":
            return None, "yes_no"
        if op in TABLE_OPS:
            row = next((r for r in data if r[2].strip().lower() == a1.strip().lower()), None)
            vals = [(name, v) for (name, _), (v, kind, _) in zip(columns, row[3]) if kind != "empty"] if row else []
            if not vals or any(v is None for _, v in vals):  # FinQA's evaluator, too, needs every cell a number
                return None, "input_not_in_table"
            slots = [cell_slot({"row_idx": row[0], "item": row[2], "section": row[1], "column": name, "value": v})
                     for name, v in vals]
            joined = " + ".join(slots)
            done.append({"table_sum": joined, "table_average": f"({joined}) / {len(slots)}",
                         "table_max": f"max({', '.join(slots)})", "table_min": f"min({', '.join(slots)})"}[op])
            continue
        if op not in OPS:
            return None, "bad_program"
        (x, why1), (y, why2) = arg(a1), arg(a2)
        if why1 or why2:
            return None, why1 or why2
        done.append(f"{x} {OPS[op]} {y}")
    return done[-1], cells


def convert_example(ex, columns, data):
    """-> (task fields, None) or (None, drop reason)."""
    qa = ex.get("qa") or {}
    inds = qa.get("gold_inds") or {}
    if not inds or any(not k.startswith("table_") for k in inds):
        return None, "needs_text"
    steps = parse_program(qa.get("program") or "")
    if steps is None:
        return None, "bad_program"
    expr, cells = program_expr(steps, columns, data)
    if expr is None:
        return None, cells
    if not cells:
        return None, "input_not_in_table"
    try:  # a number (a reformatted copy may hold it as a string); 'yes' / 'no' answer a comparison
        gold = float(qa.get("exe_ans"))
    except (TypeError, ValueError):
        return None, "yes_no" if str(qa.get("exe_ans")).strip().lower() in ("yes", "no") else "bad_program"
    try:
        value = calculate(expr.format(*[repr(c["value"]) for c in cells]))
    except (ValueError, ZeroDivisionError, OverflowError, SyntaxError, TypeError):
        return None, "program_mismatch"
    if abs(value - gold) > max(1e-4, 1e-4 * abs(gold)):  # FinQA rounds exe_ans to 5 decimals
        return None, "program_mismatch"
    answer = str(qa.get("answer") or "")
    shown = re.search(r"-?\d[\d,]*(?:\.\d+)?", answer)
    shown = float(shown.group().replace(",", "")) if shown else None
    percent = "%" in answer
    # '1.6%' for exe_ans 0.01639: answered in percent, so graded in percent, against exe_ans x 100; a program that
    # multiplies by const_100 itself has its exe_ans in percent already
    if percent and shown is not None and abs(shown - 100 * gold) < abs(shown - gold):
        return {"answer": 100 * gold, "unit": "%", "gold_cells": cells, "expr": f"({expr}) * 100"}, None
    return {"answer": float(gold), "unit": "%" if percent else "", "gold_cells": cells, "expr": expr}, None


def page_description(pre_text, data):
    """(name seed, description) of a page's table: the sentence that introduces it (the last one of the text before it
    that ends with ':' or mentions 'following table'), else its first row label."""
    intro = next((t.strip() for t in reversed(pre_text or []) if t.strip().endswith(":") or "following table" in t), "")
    desc = (intro[:220] + ("..." if len(intro) > 220 else "")) if intro else (data[0][2] if data else "table")
    seed = re.sub(r"^.*?\bfollowing table\s+(?:\w+\s+){0,2}?(?:sets forth|presents|summarizes|shows|provides|"
                  r"includes|reflects|details|illustrates)\s+", "", intro, flags=re.I) if intro else ""
    seed = re.sub(r"\(.*?\)|[:;,].*$", " ", seed).strip()
    return " ".join((seed or (data[0][2] if data else "table")).split()[:5]), desc


def convert(input_path, out, split=None):
    with open(input_path) as f:
        examples = json.load(f)
    if not isinstance(examples, list) or not examples or not all(isinstance(e, dict) and "table" in e and "qa" in e for e in examples):
        raise ValueError(f"{input_path}: expected FinQA JSON (a list of objects with 'pre_text', 'table', 'post_text', 'qa')")
    name = os.path.basename(input_path)
    split = split or ("val" if "dev" in name else "test" if "test" in name else "train")
    by_company = defaultdict(list)  # ticker -> examples, in file order
    for ex in examples:
        by_company[str(ex.get("filename") or ex["id"]).split("/")[0]].append(ex)
    os.makedirs(os.path.join(out, "dbs"), exist_ok=True)
    tasks, drops = [], Counter()
    for company, exs in by_company.items():
        db_rel = f"dbs/finqa_{split}_{snake(company, 30)}.db"
        db = sqlite_utils.Database(os.path.join(out, db_rel), recreate=True)
        catalog, raw_cells, pages, names = [], [], {}, set()  # pages: filename -> (table name, columns, data, scale)
        for ex in exs:
            page = str(ex.get("filename") or ex["id"].rsplit("-", 1)[0])
            if page not in pages:
                rows = [list(map(str, r)) for r in ex["table"]]
                columns, data, notes = parse_table([[finqa_cell(c) for c in r] for r in rows])
                seed, desc = page_description(ex.get("pre_text"), data)
                parts = page.replace(".pdf", "").split("/")  # 'ADI/2009/page_49.pdf'
                where = f" ({parts[1]} annual report, {parts[2].replace('_', ' ')})" if len(parts) == 3 else ""
                unit = UNIT_NOTE.search(" ".join(notes + [rows[0][0] if rows and rows[0] else ""]))
                tname = unique_table_name(seed, names)
                insert_table(db, tname, columns, data)
                catalog.append({"table_name": tname, "column_name": "", "description": desc + where,
                                "unit": f"$ {unit.group(1).lower()}" if unit else ""})
                catalog += [{"table_name": tname, "column_name": c, "description": f"header: {text}" if text else "", "unit": ""}
                            for c, text in columns]
                raw_cells += [{"table_name": tname, "row_idx": idx, "column_name": c, "raw": rows[idx][j + 1]}
                              for idx, _, _, cells in data for j, ((c, _), (_, kind, _)) in enumerate(zip(columns, cells))
                              if kind != "empty"]
                pages[page] = (tname, columns, data, SCALES[unit.group(1).lower()] if unit else 1.0)
            tname, columns, data, scale = pages[page]
            fields, why = convert_example(ex, columns, data)
            if why:
                drops[why] += 1
                continue
            for c in fields["gold_cells"]:
                c["table"] = tname
            tasks.append({"id": f"finqa-{ex['id']}", "question": ex["qa"]["question"], "answer": fields["answer"],
                          "answer_type": "number", "unit": fields["unit"], "scale": 1.0 if fields["unit"] == "%" else scale,
                          "db": db_rel, "split": split, "kind": "single_table", "template": "finqa",
                          "gold_tables": [tname], "gold_cells": fields["gold_cells"], "expr": fields["expr"],
                          "company": company, "program": ex["qa"].get("program", ""), "answer_text": ex["qa"].get("answer", "")})
        write_metadata(db, catalog, raw_cells)
        db.close()
    write_tasks(out, tasks)
    return tasks, drops, len(by_company)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="a FinQA split, e.g. FinQA/dataset/dev.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default=None, help="split name for the tasks (default: from the file name, dev -> val)")
    args = ap.parse_args()
    try:
        tasks, drops, n_db = convert(args.input, args.out, args.split)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        sys.exit(f"error: {e}")
    print(f"kept {len(tasks)} questions in {n_db} company databases under {args.out}")
    print(f"dropped {sum(drops.values())}" + "".join(f", {k} {v}" for k, v in drops.most_common()))


if __name__ == "__main__":
    main()
