"""
Convert rLLM's FinQA release (the Snorkel/rLLM 10-K tables behind the Qwen3-4B result, `rLLM/finqa` on the Hugging
Face hub: data.tar.gz) into SQL tasks in the tablerl format.

    tar xzf data.tar.gz                      # -> data/
    python -m data.rllm_finqa --input data --out data/generated/rllm_finqa

The input folder is laid out as rLLM's projects/finqa writes it:
    train_finqa.csv, val_finqa.csv, test_finqa.csv          questions (user_query, id, question_type, question, answer,
                                                            explanation, company, table_name, columns_used_json,
                                                            rows_used_json)
    multi_table_data/{train,val,test}_finqa.csv             the same for multi-table questions (optional)
    company_tables/<company>/tables_cleaned_all_companies.json
        {table name: {"table": a DataFrame's to_json() ({column: {row: cell}}), "description": ..., ...}}

Each company becomes one SQLite database holding all its tables, so finding the right table among the company's is
part of the task, as with rLLM's get_table_names. A table keeps its name; its first column (the row label) becomes
`item`, after a `row_idx` (the original order); every other column is REAL where each of its cells reads as a number
(currency signs, commas, (x) negatives and % removed; a dash is 0; 'n/a' and the like are NULL) with one scale word
or none (the column's unit then), else TEXT as written. Every raw cell is kept in _raw_cells and each table's
description in _catalog.

The tables are LLM-extracted, so their text is lowercase with underscores for spaces ("total_net_sales"); labels keep
that form (the questions' rows_used name them so). Descriptions get their spaces back.

Kept: questions whose answer is one number (rLLM grades answers with an LLM judge; tablerl grades numbers, so a text
answer or one with several numbers cannot be graded here). Dropped, with counts per reason printed: no number, several
numbers, "which year" answers, a company or table not in company_tables. For the kept tasks the converter also looks
for the answer's derivation: the numeric cells at rows_used x columns_used (every row of a label that repeats) and
a small set of forms over all or some of them (one cell, sums, differences, ratios, percent changes, the mean, a
product, three-cell forms like (a + b) / c, and four-cell ones like the percent change of a sum). Where one
reproduces the answer the task gets gold_cells and an expr, and the scripted oracle (eval.py --policy oracle) and the
warm start (--sft-steps) can use it; the others are for GRPO and evaluation only. On TAT-QA dev's tables and
questions written in this format (the test suite does it) a derivation is found for 838 of 856, and each is right.
"""
import argparse
import csv
import functools
import itertools
import json
import os
import re
import sys
import time
from collections import Counter

import sqlite_utils

from data.tatqa import NA, clean_cell, write_metadata, write_tasks
from env_sql import calculate, parse_number

SPLITS = ("train", "val", "test")
TABLES_FILE = "tables_cleaned_all_companies.json"
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")
SCALE_WORD = re.compile(r"\b(million|billion|m|bn)\b", re.I)  # the scale words data.tatqa.clean_cell reads past
MAX_CELLS = 8  # more cells than this and the forms below are guesses, not derivations


def identifier(text, fallback="col"):
    """A SQLite-friendly name: lowercase letters, digits and underscores, not starting with a digit."""
    s = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    return (s if s[:1].isalpha() else f"c_{s}") if s else fallback


def token(text):
    """rLLM's loose match of a label or column: lowercase alphanumerics joined by underscores."""
    return re.sub(r"[^0-9a-z]+", "_", re.sub(r"\s+", " ", str(text or "")).strip().lower()).strip("_")


def read_frame(table_json, where):
    """A DataFrame's to_json() (orient 'columns', pandas' default: {column: {row: cell}}) or a list of records ->
    (headers, rows of cells), rows in index order."""
    data = json.loads(table_json) if isinstance(table_json, str) else table_json
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        headers = list(dict.fromkeys(k for r in data for k in r))
        return headers, [[r.get(h) for h in headers] for r in data]
    if not isinstance(data, dict) or not all(isinstance(c, dict) for c in data.values()):
        raise ValueError(f"{where}: 'table' is not a DataFrame's JSON ({{column: {{row: cell}}}} or a list of records)")
    headers = list(data)
    index = list(dict.fromkeys(k for c in data.values() for k in c))
    if all(k.lstrip("-").isdigit() for k in index):  # a RangeIndex, written as "0", "1", ..., "10": numeric order
        index.sort(key=int)
    return headers, [[data[h].get(k) for h in headers] for k in index]


def table_name(key):
    """A table's key (a file name: 'us_gaap_...TextBlock', maybe with '.json' or a hyphen) as a SQLite table name."""
    key = str(key).strip()
    return re.sub(r"[^A-Za-z0-9_]+", "_", key[:-5] if key.endswith(".json") else key).strip("_")


def cell_number(raw):
    """A cell as a number, or None: underscores read as spaces ('$_1,234' is '$ 1,234')."""
    v, kind = clean_cell(str(raw).replace("_", " "))
    return v if kind in ("num", "dash") else None


def no_value(raw):
    """A cell that cell_number does not read and that says there is no value: 'n/a', 'nm', or dashes and signs
    clean_cell does not read as its 0 ('- - %'; '—' is 0). Such a cell is NULL in a column of numbers (its text stays in
    _raw_cells), where text like 'see_note_5' makes the whole column TEXT."""
    s = str(raw).replace("_", " ").strip().lower()
    return s in NA or bool(re.fullmatch(r"[-—–−$%().\s]+", s))


def scale_word(raw):
    """The scale word a numeric cell carries ('$_1.2_billion' -> 'billions'), which clean_cell reads past, or ''."""
    m = SCALE_WORD.search(str(raw).replace("_", " "))
    return {"m": "millions", "bn": "billions"}.get(m.group(1).lower(), m.group(1).lower() + "s") if m else ""


def build_table(db, name, headers, rows):
    """Write one table -> (columns [(sql name, header, is_real, unit)], the records as written). A column is REAL when
    every cell reads as a number with the same scale word or none ('$_900_million' and '$_1.2_billion' in one column
    stay TEXT: as numbers they would mix units); the shared word is the column's unit. The cells of header rows inside
    the table do not count (below)."""
    written = lambda x: x is not None and str(x).replace("_", " ").strip() != ""  # '__' is two spaces: blank
    nums = [[cell_number(x) if written(x) else None for x in r] for r in rows]  # each cell read once
    # a row whose written cells are all text (past its label) is a header or section row inside the table: a second
    # block's 'Dec 29, 2018', "Liabilities and Stockholders' Equity". Its text does not make a column of numbers TEXT
    # (NULL there, the text kept in _raw_cells, as data.tatqa does with such cells)
    heading = [any(written(x) for x in r[1:])
               and all(v is None and not no_value(x) for x, v in zip(r[1:], n[1:]) if written(x))
               for r, n in zip(rows, nums)]
    cols, taken = [], {"row_idx", "item"}
    for j, h in enumerate(headers[1:], 1):
        base = identifier(h)
        c, k = base, 2
        while c in taken:
            c, k = f"{base}_{k}", k + 1
        taken.add(c)
        cells = [(r[j], n[j]) for r, n, head in zip(rows, nums, heading)
                 if written(r[j]) and not head and (n[j] is not None or not no_value(r[j]))]
        words = {scale_word(x) for x, _ in cells}
        real = bool(cells) and all(v is not None for _, v in cells) and len(words) == 1
        cols.append((c, h, real, words.pop() if real else ""))
    recs = []
    for i, (r, n) in enumerate(zip(rows, nums)):
        rec = {"row_idx": i, "item": None if r[0] is None else str(r[0]).strip()}
        for j, ((c, _, real, _), x) in enumerate(zip(cols, r[1:]), 1):
            # in a REAL column a no-value cell reads as None, so it is NULL
            rec[c] = n[j] if real else str(x).strip() if written(x) else None
        recs.append(rec)
    db[name].insert_all(recs, columns={"row_idx": int, "item": str, **{c: float if real else str for c, _, real, _ in cols}})
    return cols, recs


# the exprs tried over a question's cells: what a 10-K question asks of two to four numbers. The three-cell ones are
# the commonest of TAT-QA dev's three-cell derivations (a part of a sum, a change over a base); in its rLLM-format test
# they raise the questions with a derivation from 816 to 826 of 856. (a - b) / a is the share of a total outside a part;
# (a + b) / 2 - (b + c) / 2 the change of a two-year average (three cells, one read twice)
FORMS2 = ["{0} + {1}", "{0} - {1}", "{1} - {0}", "({0} - {1}) / {1} * 100", "({1} - {0}) / {0} * 100", "{0} / {1}",
          "{1} / {0}", "{0} / {1} * 100", "{1} / {0} * 100", "({0} + {1}) / 2", "{0} * {1}",
          "({0} - {1}) / {0} * 100", "({1} - {0}) / {1} * 100"]
SUMS3 = ["{0} + {1} + {2}", "({0} + {1} + {2}) / 3"]  # over some three or more cells (FORMS3 covers exactly three)
FORMS3 = ["({0} + {1}) / {2}", "({0} + {1}) / {2} * 100", "({0} - {1}) / {2}", "({0} - {1}) / {2} * 100",
          "{0} + {1} - {2}", "({0} + {1}) / 2 - ({1} + {2}) / 2"]
FORMS4 = ["({0} + {1}) / 2 - ({2} + {3}) / 2", "(({0} - {1}) + ({2} - {3})) / 2", "{0} / {1} - {2} / {3}",
          "({0} - ({1} + {2})) / {0} * 100", "(({0} + {1}) - ({2} + {3})) / ({2} + {3}) * 100"]


@functools.lru_cache(maxsize=None)
def compiled(expr, n):
    """A form over {0}..{n-1} as a Python function of n floats: the search evaluates thousands of tries per question,
    ~200x faster than env_sql.calculate (0.2 us against 40), which then checks the one that matched."""
    args = [f"c{i}" for i in range(n)]
    return eval(f"lambda {', '.join(args)}: {expr.format(*args)}")  # our own constant strings, never data


def tries(cells):
    """(expr, the cells it reads), simplest first: each cell alone (a lookup); then forms over all the cells (two:
    FORMS2; three: FORMS3 in every order; and any number: the sum, the mean); then forms over some of them, since
    rows_used x columns_used can name more cells than the answer reads (a ratio of two rows' cells in two different
    years): pairs, the sum and mean of triples, then ordered triples. Last, for exactly four cells, the four-cell forms
    in every order (the percent change of a sum, the change of an average)."""
    n = len(cells)
    yield from (("{0}", [c]) for c in cells)
    if n == 2:
        yield from ((e, cells) for e in FORMS2)
    if n == 3:
        yield from ((e, list(p)) for p in itertools.permutations(cells) for e in FORMS3)
    if n >= 3:
        terms = " + ".join(f"{{{i}}}" for i in range(n))
        yield from ((terms, cells), (f"({terms}) / {n}", cells))
        yield from ((e, list(p)) for p in itertools.combinations(cells, 2) for e in FORMS2)
    if n >= 4:
        yield from ((e, list(p)) for p in itertools.combinations(cells, 3) for e in SUMS3)
        yield from ((e, list(p)) for p in itertools.permutations(cells, 3) for e in FORMS3)
    if n == 4:  # last: with 24 orders of four cells, a form can match by chance where a pair reads the answer
        yield from ((e, list(p)) for p in itertools.permutations(cells) for e in FORMS4)


def derive(answer, cells, rel_only=False):
    """-> (expr, the cells it reads) for the first of tries(cells) whose value matches answer within the grader's
    tolerance, else None. rel_only: without the grader's absolute 0.01, for an answer restated in other units, where
    0.00633 (6.33 million in billions) would match 0."""
    tol = 1e-3 * abs(answer) if rel_only else max(0.01, 1e-3 * abs(answer))
    for expr, used in tries(cells):
        try:
            if abs(compiled(expr, len(used))(*[c["value"] for c in used]) - answer) > tol:
                continue
            if abs(calculate(expr.format(*[repr(c["value"]) for c in used])) - answer) <= tol:
                return expr, used
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
    return None


def gold_cells(q, tables, names):
    """-> the readings of the question's cells, most likely first: each a list of the numeric cells at rows_used x
    columns_used in the question's tables, in their order ([{table, row_idx, item, column, value}]). The first reading
    takes the first row of each label. A label can name several rows (a table of two blocks under one header repeats
    'Total'; 7.7% of TAT-QA's tables repeat a label within a section): then a second reading takes all of them, and
    derive() looks for the answer in some of its cells too. Each cell has its row_idx, so the oracle's query finds the
    row the derivation read."""
    rows_used = [r for r in map(token, json_list(q.get("rows_used_json"))) if r]
    cols_used = [c for c in map(token, json_list(q.get("columns_used_json"))) if c]
    slots = []  # per (table, label): the cells asked of each row it names
    for t in names:
        cols, recs = tables[t]
        by_header = {token(h): c for c, h, real, _ in cols if real}
        want_cols = [by_header[c] for c in cols_used if c in by_header]
        for r in rows_used:
            hits = [rec for rec in recs if token(rec["item"]) == r]
            if not hits:  # rLLM's rows_used may name a cell of another text column
                hits = [rec for rec in recs if any(token(v) == r for v in rec.values() if isinstance(v, str))]
            per_row = [[{"table": t, "row_idx": h["row_idx"], "item": h["item"], "column": c, "value": h[c]}
                        for c in want_cols if h[c] is not None] for h in hits]
            if any(per_row):
                slots.append([cells for cells in per_row if cells])
    readings = [[c for slot in slots for c in slot[0]]]
    if any(len(slot) > 1 for slot in slots):
        readings.append([c for slot in slots for cells in slot for c in cells])
    return readings


def json_list(value):
    """A CSV cell holding a JSON list (or a bare string) -> list of strings, as rLLM's prepare_finqa_data reads it."""
    value = (value or "").strip()
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return [value]
    return [str(x) for x in parsed] if isinstance(parsed, list) else [str(parsed)]


def read_answer(text, question):
    """-> (value, percent, scale) or (None, drop reason). The answer must hold exactly one number."""
    text = str(text or "").replace("_", " ").strip()
    if text.startswith("\\boxed{") and text.endswith("}"):
        text = text[len("\\boxed{"):-1]
    nums = NUMBER.findall(text)
    if not nums:
        return None, "text_answer"
    if len(nums) > 1:
        return None, "several_numbers"
    if re.fullmatch(r"(19|20)\d\d", nums[0]) and "year" in question.lower():
        return None, "year_answer"
    p = parse_number(text)
    return (p.value, p.percent, p.scale), None


def convert(input_dir, out):
    tables_root = os.path.join(input_dir, "company_tables")
    files = [(split, kind, os.path.join(input_dir, sub, f"{split}_finqa.csv"))
             for kind, sub in (("single_table", ""), ("multi_table", "multi_table_data")) for split in SPLITS]
    files = [f for f in files if os.path.exists(f[2])]
    if not files:
        raise FileNotFoundError(f"{input_dir}: no train_finqa.csv, val_finqa.csv or test_finqa.csv (expected rLLM's "
                                f"finqa data folder, the data/ of its data.tar.gz)")
    if not os.path.isdir(tables_root):
        raise FileNotFoundError(f"{input_dir}: no company_tables/ folder (rLLM's per-company table JSON)")
    os.makedirs(os.path.join(out, "dbs"), exist_ok=True)
    companies = {}  # company -> {table: (columns, records)}, built on first use
    t0 = time.time()
    dirs = {d.lower(): d for d in os.listdir(tables_root)}  # rLLM looks companies up in lowercase

    def company_tables(company):
        if company in companies:
            return companies[company]
        path = os.path.join(tables_root, dirs.get(company, company), TABLES_FILE)
        if not os.path.exists(path):
            companies[company] = None
            return None
        with open(path) as f:
            meta = json.load(f)
        db = sqlite_utils.Database(os.path.join(out, "dbs", f"{identifier(company, 'company')}.db"), recreate=True)
        tables, catalog, raw_cells = {}, [], []
        for key, info in meta.items():
            name = base = table_name(key) or "table"
            k = 2
            while name.lower() in {t.lower() for t in tables}:  # SQLite's names are case-insensitive
                name, k = f"{base}_{k}", k + 1
            headers, rows = read_frame(info.get("table", "{}"), f"{path}: table {key!r}")
            if not headers or not rows:
                continue  # rLLM does not load empty tables either
            cols, recs = build_table(db, name, headers, rows)
            tables[name] = (cols, recs)
            desc = str(info.get("description") or info.get("title") or "").replace("_", " ").strip()
            catalog.append({"table_name": name, "column_name": "", "description": desc, "unit": ""})
            catalog.append({"table_name": name, "column_name": "item", "description": f"row label (header: {headers[0]})", "unit": ""})
            catalog += [{"table_name": name, "column_name": c, "description": f"header: {h}" if c != h else "", "unit": unit}
                        for c, h, _, unit in cols if c != h or unit]
            raw_cells += [{"table_name": name, "row_idx": i, "column_name": c, "raw": str(x)}
                          for i, r in enumerate(rows) for (c, _, real, _), x in zip(cols, r[1:])
                          if real and x is not None and str(x).strip()]
        write_metadata(db, catalog, raw_cells)
        db.close()
        companies[company] = tables
        built = sum(v is not None for v in companies.values())
        if built % 25 == 0:  # the release holds a few hundred companies
            print(f"  {built} company databases, {built / (time.time() - t0):.1f}/s", file=sys.stderr, flush=True)
        return tables

    tasks, drops = [], Counter()
    for split, kind, path in files:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"id", "company", "answer", "table_name"} - set(reader.fieldnames or [])
            if missing or not {"user_query", "question"} & set(reader.fieldnames or []):
                raise ValueError(f"{path}: not an rLLM finqa question file (lacks column(s) "
                                 f"{sorted(missing) or ['user_query or question']})")
            for q in reader:
                company = q["company"].strip().lower()
                question = q.get("user_query") or f"For company `{company}`, here is the question: {q['question']}"
                got, why = read_answer(q["answer"], q.get("question") or question)
                tables = None if why else company_tables(company)
                if not why and tables is None:
                    why = "company_missing"
                names = [table_name(t) for t in json_list(q["table_name"])]
                if not why:  # as rLLM's tools look them up: case-insensitive, a '.json' suffix ignored
                    lower = {t.lower(): t for t in tables}
                    names = [lower.get(t.lower()) for t in names]
                    if not names or None in names:
                        why = "table_missing"
                if why:
                    drops[why] += 1
                    continue
                value, percent, scale = got
                task = {"id": f"rllm-finqa-{'mt-' if kind == 'multi_table' else ''}{split}-{q['id']}", "question": question,
                        "answer": value, "answer_type": "number", "unit": "%" if percent else "", "scale": scale,
                        "db": f"dbs/{identifier(company, 'company')}.db", "split": split, "kind": kind,
                        "template": q.get("question_type") or kind, "gold_tables": names, "company": company,
                        "answer_text": q["answer"]}
                readings = [c for c in gold_cells(q, tables, names) if 0 < len(c) <= MAX_CELLS]
                # an answer with a scale word may be in other units than its cells ('$394.3 billion' of cells in
                # millions): then the gold is restated in the cells' units, so that the number read from the table
                # grades as right, and '394.3 billion' still does through the task's scale
                for factor in (1.0, 1e3, 1e6, 1e-3, 1e-6) if scale != 1.0 else (1.0,):
                    found = next(filter(None, (derive(value * factor, cells, factor != 1.0) for cells in readings)), None)
                    if found:
                        task["expr"], task["gold_cells"] = found
                        task["answer"], task["scale"] = value * factor, scale / factor
                        break
                tasks.append(task)
    write_tasks(out, tasks)
    return tasks, drops, sum(v is not None for v in companies.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="rLLM's finqa data folder (holds train_finqa.csv and company_tables/)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        tasks, drops, n_db = convert(args.input, args.out)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    per = Counter((t["split"], t["kind"]) for t in tasks)
    print(f"kept {len(tasks)} questions in {n_db} company databases under {args.out}: "
          + ", ".join(f"{s}/{k} {n}" for (s, k), n in sorted(per.items())))
    print(f"with a derivation the oracle can follow: {sum('expr' in t for t in tasks)}")
    print(f"dropped {sum(drops.values())}" + "".join(f", {k} {v}" for k, v in drops.most_common()))


if __name__ == "__main__":
    main()
