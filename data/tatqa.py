"""
Convert TAT-QA (Zhu et al., ACL 2021; CC BY 4.0) raw JSON into SQL tasks in the tablerl format.

    python -m data.tatqa --input ../shared/data/tatqa/tatqa_dataset_dev.json --out data/generated/tatqa_dev

Any public split works (train, dev, test). Each TAT-QA table becomes a wide SQLite table: row_idx (original order),
section (the nearest section row above), item (the cleaned row label), then one REAL column per value column, named
y2019 where the header holds one year, else a snake_case form of the header. Values are cleaned of currency signs,
commas, footnotes, (x) negatives and %; a dash becomes 0; every raw cell text is kept in _raw_cells. 8-12 tables are
packed per database, so finding the right table is part of the task; _catalog holds each table's description (from
captions and headings) and the original header text and unit of each column.

Kept: table-only and table-text questions with one numeric answer whose every input is a cell of the table
(arithmetic: the numbers of the derivation; spans: the number itself). Dropped, with counts per reason printed:
text and multi-span answers, counts, "which year" answers, derivations whose inputs are not all table cells, inputs
that match a cell only up to its sign (annotators often drop the sign; we drop the question rather than grade
|pred| = |gold|), and derivations that do not reproduce the gold answer.
"""
import argparse
import json
import os
import random
import re
from collections import Counter

import sqlite_utils

from env_sql import calculate

CURRENCY = r"(?:US\$|S\$|A\$|HK\$|C\$|NZ\$|RMB|EUR|GBP|JPY|USD|\$|€|£|¥)"
CELL = re.compile(rf"(?:{CURRENCY}\s*(?=\())?(?P<lp>\()?\s*(?P<s1>[-+])?\s*{CURRENCY}?\s*(?P<s2>[-+])?\s*(?P<num>\d[\d,]*(?:\.\d+)?|\.\d+)\s*"
                  rf"(?P<rp>\))?\s*(?P<pct>%)?\s*(?P<rp2>\))?\s*(?:bps|pts|x|years?|times|million|billion|m|bn)?\s*"
                  rf"(?:\(\w{{1,2}}\)|\*+)?", re.I)
DASHES = re.compile(r"^[(]?\s*" + CURRENCY + r"?\s*[-—–―‒]+\s*%?\s*[)]?$")
NA = {"n/a", "n.a.", "na", "nm", "n.m.", "none", "nil"}
YEAR = re.compile(r"\b(19[89]\d|20[0-4]\d)\b")


def clean_cell(raw):
    """-> (value or None, kind) with kind in num | dash | empty | text."""
    s = (raw or "").strip().replace("\u2212", "-").replace("\u2013", "-")
    if not s:
        return None, "empty"
    if DASHES.match(s):
        return 0.0, "dash"
    if s.lower() in NA:
        return None, "text"
    m = CELL.fullmatch(s)
    if not m:
        return None, "text"
    v = float(m.group("num").replace(",", ""))
    if "-" in (m.group("s1") or "", m.group("s2") or "") or (m.group("lp") and (m.group("rp") or m.group("rp2"))):
        v = -v
    return v, "num"


def snake(text, maxlen=40):
    text = re.sub(r"^\s*(?:note\s+)?\d+[.:]?\s+", "", text, flags=re.I)  # "9. Accrued ..." -> "Accrued ..."
    text = text.replace("%", " pct ").replace("$", " amount ")
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:maxlen].strip("_")
    return s if s and s[0].isalpha() else f"c_{s}" if s else "col"


def parse_table(rows):
    """-> (columns [(name, header text)], data rows [(orig idx, section, item, [(value, kind, raw)])], header notes)."""
    ncol = max(len(r) for r in rows)
    rows = [list(r) + [""] * (ncol - len(r)) for r in rows]
    # header rows: the leading rows with no number, or with an empty label and only years as numbers; once column
    # headers were seen, a labelled row with empty cells is a section row of the data ("Revenue:")
    n_head, seen_headers = 0, False
    for r in rows:
        vals = [(v, k) for v, k in map(clean_cell, r[1:]) if k == "num"]
        if vals and not all(v == int(v) and 1980 <= v < 2050 for v, _ in vals):  # a row of years is a header
            break
        if seen_headers and r[0].strip() and not any(c.strip() for c in r[1:]):
            break
        seen_headers |= any(c.strip() for c in r[1:])
        n_head += 1
    notes = [rows[i][0].strip() for i in range(n_head) if rows[i][0].strip()]  # e.g. "(In millions, except ...)"
    heads = []
    for i in range(n_head):
        h, last = [], ""
        for j in range(1, ncol):  # spanning headers fill to the right, except in the last header row
            c = rows[i][j].strip()
            last = c or (last if i < n_head - 1 else "")
            h.append(last)
        heads.append(h)
    columns, used = [], Counter()
    for j in range(ncol - 1):
        text = " ".join(h[j] for h in heads if h[j]).strip()
        years = set(YEAR.findall(text))
        name = f"y{years.pop()}" if len(years) == 1 else snake(text) if text else f"col{j + 1}"
        used[name] += 1
        if used[name] > 1:
            name = f"{name}_{used[name]}"
        columns.append((name, text))
    data, section = [], ""
    for i in range(n_head, len(rows)):
        label = rows[i][0].strip()
        cells = [(*clean_cell(c), c) for c in rows[i][1:]]
        if all(k == "empty" for _, k, _ in cells):
            if label:
                section = label.rstrip(":")
            continue
        data.append((i, section, label or "(unlabeled total)", cells))
    return columns, data, notes


def describe(paragraphs, rows):
    """(name seed, description) from a heading ('Note 3. Revenue'), a caption ('... the following table:'), a
    'Total ...' label or the top-left cell."""
    ps = sorted(paragraphs, key=lambda p: p.get("order", 0))
    heading = next((p["text"].strip() for p in ps if 3 < len(p["text"].strip()) <= 60 and not p["text"].strip().endswith(".")), "")
    caption = next((p["text"].strip() for p in ps if p["text"].strip().endswith(":") or "following table" in p["text"]
                    or "as follows" in p["text"]), "")
    total = next((r[0] for r in rows if r and r[0].strip().lower().startswith("total")), "")
    topleft = rows[0][0].strip() if rows and rows[0] else ""
    seed = heading or total or topleft or caption or "table"
    seed = re.sub(r"^(note\s+\d+[.:]?\s*)", "", seed, flags=re.I)
    desc = (caption[:220] + ("..." if len(caption) > 220 else "")) if caption else heading or total or topleft or "table"
    if heading and caption and heading not in desc:
        desc = f"{heading}: {desc}"
    return " ".join(seed.split()[:5]), desc


def derivation_numbers(derivation):
    d = derivation.replace(",", "").replace("%", "").replace("$", "").replace("\u2212", "-")
    d = d.replace("[", "(").replace("]", ")").replace("{", "(").replace("}", ")")
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", d)], d


# numbers a derivation may use that are not table cells: averages (/2, /3), percent (*100), unit changes
CONSTANTS = {1.0, 2.0, 3.0, 4.0, 5.0, 12.0, 100.0, 1000.0, 1000000.0}


def find_cell(v, columns, data):
    """A cell whose cleaned value equals v: ('exact' | 'abs_only' | None, cell)."""
    abs_hit = None
    for idx, section, item, cells in data:
        for (name, _), (val, kind, raw) in zip(columns, cells):
            if val is None:
                continue
            if abs(val - v) < 1e-9:
                return "exact", {"row_idx": idx, "item": item, "section": section, "column": name, "value": val}
            if abs_hit is None and abs(abs(val) - v) < 1e-9:
                abs_hit = {"row_idx": idx, "item": item, "section": section, "column": name, "value": val}
    return ("abs_only", abs_hit) if abs_hit else (None, None)


SCALE = {"": 1.0, "thousand": 1e3, "million": 1e6, "billion": 1e9, "percent": 1.0}


def convert_question(q, columns, data):
    """-> (task fields, None) or (None, drop reason)."""
    if q.get("answer_from") not in ("table", "table-text"):
        return None, "needs_text"
    at, ans = q.get("answer_type"), q.get("answer")
    if at == "count":
        return None, "count"
    if at == "multi-span" or (isinstance(ans, list) and len(ans) != 1):
        return None, "multi_span"
    if at == "span":
        text = ans[0] if isinstance(ans, list) else str(ans)
        v, kind = clean_cell(text)
        if kind != "num":
            return None, "text_answer"
        if YEAR.fullmatch(text.strip()) and "year" in q["question"].lower():
            return None, "year_answer"
        hit, c = find_cell(v, columns, data)
        if hit != "exact":
            return None, "input_not_in_table" if hit is None else "sign_mismatch"
        return {"answer": v, "gold_cells": [c], "expr": "{0}"}, None
    if at != "arithmetic":
        return None, "other_type"
    try:
        gold = float(ans)
    except (TypeError, ValueError):
        return None, "text_answer"
    nums, d = derivation_numbers(q.get("derivation") or "")
    if not nums:
        return None, "no_derivation"
    cells, slots = [], []  # slots: per number in the derivation, a cell index or the literal constant
    for v in nums:
        hit, c = find_cell(v, columns, data)
        if hit == "exact":
            slots.append("{%d}" % len(cells))
            cells.append(c)
        elif hit is None and v in CONSTANTS:
            slots.append(repr(v))
        else:
            return None, "input_not_in_table" if hit is None else "sign_mismatch"
    if not cells:
        return None, "input_not_in_table"
    it = iter(slots)  # the derivation with placeholders, in order of appearance
    expr = re.sub(r"\d+(?:\.\d+)?", lambda m: next(it), d)
    try:
        value = calculate(expr.format(*[repr(c["value"]) for c in cells]))
    except (ValueError, ZeroDivisionError, SyntaxError, TypeError, OverflowError):
        return None, "derivation_unparsed"
    for e, v in ((expr, value), (f"({expr}) * 100", value * 100)):
        if abs(round(v, 2) - gold) <= max(0.01, 1e-3 * abs(gold)):
            return {"answer": gold, "gold_cells": cells, "expr": e}, None
    return None, "derivation_mismatch"


def convert(input_path, out, split=None, seed=0, min_tables=8, max_tables=12):
    with open(input_path) as f:
        contexts = json.load(f)
    if not isinstance(contexts, list) or not contexts or "table" not in contexts[0]:
        raise ValueError(f"{input_path}: expected TAT-QA JSON (a list of objects with 'table', 'paragraphs', 'questions')")
    split = split or ("val" if "dev" in os.path.basename(input_path) else "test" if "test" in os.path.basename(input_path) else "train")
    rng = random.Random(seed)
    order = list(range(len(contexts)))
    rng.shuffle(order)
    groups, i = [], 0
    while i < len(order):
        n = rng.randint(min_tables, max_tables)
        groups.append(order[i:i + n])
        i += n
    os.makedirs(os.path.join(out, "dbs"), exist_ok=True)
    tasks, drops = [], Counter()
    for g, members in enumerate(groups):
        db_rel = f"dbs/tatqa_{split}_{g:03d}.db"
        db = sqlite_utils.Database(os.path.join(out, db_rel), recreate=True)
        catalog, raw_cells, names = [], [], set()
        for ci in members:
            ctx = contexts[ci]
            rows = ctx["table"]["table"]
            columns, data, notes = parse_table(rows)
            seed_name, desc = describe(ctx.get("paragraphs", []), rows)
            if notes:
                desc += " " + " ".join(notes)
            name = unique_table_name(seed_name, names)
            insert_table(db, name, columns, data)
            catalog.append({"table_name": name, "column_name": "", "description": desc, "unit": ""})
            for c, text in columns:
                catalog.append({"table_name": name, "column_name": c, "description": f"header: {text}" if text else "", "unit": ""})
            raw_cells += [{"table_name": name, "row_idx": idx, "column_name": c, "raw": raw}
                          for idx, _, _, cells in data for (c, _), (_, kind, raw) in zip(columns, cells) if kind != "empty"]
            for q in ctx["questions"]:
                fields, why = convert_question(q, columns, data)
                if why:
                    drops[why] += 1
                    continue
                for c in fields["gold_cells"]:
                    c["table"] = name
                scale = q.get("scale", "")
                tasks.append({"id": f"tatqa-{q['uid']}", "question": q["question"], "answer": fields["answer"],
                              "answer_type": "number", "unit": "%" if scale == "percent" else scale,
                              "scale": SCALE.get(scale, 1.0), "db": db_rel, "split": split, "kind": "single_table",
                              "template": q.get("answer_type"), "gold_tables": [name], "gold_cells": fields["gold_cells"],
                              "expr": fields["expr"], "answer_from": q.get("answer_from"), "derivation": q.get("derivation", "")})
        write_metadata(db, catalog, raw_cells)
        db.close()
    write_tasks(out, tasks)
    return tasks, drops, len(groups)


def unique_table_name(seed, names):
    """A table name from a seed phrase, snake_case, made unique among names with _2, _3, ... (and added to them)."""
    name, k = snake(seed, 40), 2
    while name in names:
        name, k = f"{snake(seed, 36)}_{k}", k + 1
    names.add(name)
    return name


def insert_table(db, name, columns, data):
    """One parsed table (parse_table's columns and data rows) as a wide SQLite table: row_idx, section, item, then a
    REAL column per value column."""
    recs = [{"row_idx": idx, "section": sec, "item": item, **{c: v for (c, _), (v, _, _) in zip(columns, cells)}}
            for idx, sec, item, cells in data]
    db[name].insert_all(recs, columns={"row_idx": int, "section": str, "item": str, **{c: float for c, _ in columns}})


def write_metadata(db, catalog, raw_cells):
    """The two tables every converted database has beside its data: _catalog (table_name, column_name, description,
    unit; column_name '' describes the table) and _raw_cells (each cell as the source wrote it)."""
    db["_catalog"].insert_all(catalog, columns={"table_name": str, "column_name": str, "description": str, "unit": str})
    db["_raw_cells"].insert_all(raw_cells, columns={"table_name": str, "row_idx": int, "column_name": str, "raw": str})
    db.conn.commit()


def write_tasks(out, tasks):
    with open(os.path.join(out, "tasks.jsonl"), "w") as f:
        for t in tasks:
            f.write(json.dumps(t) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="a TAT-QA split, e.g. tatqa_dataset_dev.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default=None, help="split name for the tasks (default: from the file name)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tasks, drops, n_db = convert(args.input, args.out, args.split, args.seed)
    kept = Counter(t["answer_from"] for t in tasks)
    print(f"kept {len(tasks)} questions ({dict(kept)}) in {n_db} databases under {args.out}")
    print(f"dropped {sum(drops.values())}" + "".join(f", {k} {v}" for k, v in drops.most_common()))


if __name__ == "__main__":
    main()
