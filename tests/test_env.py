"""The SQL environment against SQLite itself: hostile SQL, malformed calls, grading, the rubric."""
import hashlib
import os
import sqlite3
import time

import pytest

from env_sql import SQLEnv, TOOLS, answer_grounded, calculate, grade, parse_number, rubric, rubric_rates


@pytest.fixture()
def db(tmp_path):
    """A real SQLite file: two tables, one of 3,000 rows (big enough for a runaway cross join)."""
    path = str(tmp_path / "fin.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE income_statement (row_idx INTEGER, section TEXT, item TEXT, y2022 REAL, y2023 REAL)")
    conn.executemany("INSERT INTO income_statement VALUES (?,?,?,?,?)",
                     [(0, "", "Total revenue", 100.0, 125.0), (1, "", "Net income", 10.0, 12.5)])
    conn.execute("CREATE TABLE big (x INTEGER)")
    conn.executemany("INSERT INTO big VALUES (?)", [(i,) for i in range(3000)])
    conn.execute("CREATE TABLE _catalog (table_name TEXT, column_name TEXT, description TEXT, unit TEXT)")
    conn.execute("INSERT INTO _catalog VALUES ('income_statement', '', 'Income statement', '$ millions')")
    conn.commit()
    conn.close()
    return path


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


HOSTILE = [
    "DROP TABLE income_statement",
    "INSERT INTO income_statement VALUES (9, '', 'x', 1, 2)",
    "UPDATE income_statement SET y2023 = 0",
    "DELETE FROM income_statement",
    "CREATE TABLE evil (x)",
    "ATTACH DATABASE '{dir}/new.db' AS other",
    "VACUUM INTO '{dir}/copy.db'",
    "PRAGMA writable_schema = ON",
    "PRAGMA journal_mode = WAL",
    "SELECT load_extension('/tmp/nope')",
    "SELECT 1; DROP TABLE income_statement",
    "SELECT 1; SELECT 2",
    "WITH x AS (SELECT 1) INSERT INTO income_statement SELECT * FROM income_statement",
    "/* sneaky */ DELETE FROM income_statement",
    "SELECT * FROM income_statement; -- trailing\nDROP TABLE big",
    "REPLACE INTO big VALUES (1)",
]


def test_hostile_sql_changes_nothing(db, tmp_path):
    before, files = digest(db), sorted(os.listdir(tmp_path))
    with SQLEnv(db) as env:
        for q in HOSTILE:
            out = env.call("sql_query", {"query": q.format(dir=tmp_path)})
            assert out.startswith("Error"), (q, out)
        assert env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Total revenue'"}) == "y2023\n125"
    assert digest(db) == before, "database bytes changed"
    assert sorted(os.listdir(tmp_path)) == files, "a file was created"
    # and SQLite itself confirms the table is intact
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM big").fetchone()[0] == 3000


def test_runaway_queries_stop_within_budget(db):
    with SQLEnv(db, time_budget_s=0.5) as env:
        for q in ["WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r",
                  "SELECT COUNT(*) FROM big a, big b, big c"]:
            t = time.monotonic()
            out = env.call("sql_query", {"query": q})
            assert time.monotonic() - t < 2.0 and "budget" in out, out
            assert env.log[-1].error == "timeout"
        assert env.call("sql_query", {"query": "SELECT COUNT(*) FROM big"}) == "COUNT(*)\n3000"


def test_huge_values_and_outputs_are_bounded(db):
    with SQLEnv(db, max_rows=30, max_chars=2000) as env:
        out = env.call("sql_query", {"query": "SELECT randomblob(1000000000)"})
        assert out.startswith("Error") and "too big" in out
        out = env.call("sql_query", {"query": "SELECT hex(randomblob(40000)) AS h"})
        assert len(out) <= 2000 + 60 and "[truncated:" in out
        out = env.call("sql_query", {"query": "SELECT x FROM big"})
        assert out.count("\n") == 31 and out.endswith("[truncated: 2970 more rows]")
        out = env.call("sql_query", {"query": "SELECT a.x FROM big a, big b"})  # 9M rows: counting hits the budget
        assert "[truncated:" in out and out.count("\n") >= 30


def test_tools_describe_tables_and_recover_hints(db):
    with SQLEnv(db) as env:
        assert env.call("get_table_names", {}) == "big\nincome_statement: Income statement"
        info = env.call("get_table_info", {"table_name": "income_statement"})
        assert "y2023 REAL" in info and "Rows: 2" in info and "Total revenue; Net income" in info
        out = env.call("get_table_info", {"table_name": "revenue"})
        assert out == "Error: no table named 'revenue'. Tables: big, income_statement."
        out = env.call("sql_query", {"query": "SELECT revenue FROM income_statement"})
        assert "no such column: revenue" in out and "income_statement(row_idx, section, item, y2022, y2023)" in out
        out = env.call("sql_query", {"query": "SELECT * FROM sales"})
        assert "no such table: sales" in out and "Tables: big, income_statement" in out
        assert env.call("sql_query", {"query": "SELEC 1"}).startswith("Error")
        assert env.call("calculator", {"expression": "(125 - 100) / 100 * 100"}) == "25"
        assert [c.error for c in env.log] == ["", "", "unknown_table", "unknown_column", "unknown_table", "not_read_only", ""]


@pytest.mark.parametrize("name,args,fragment", [
    ("drop_table", {}, "unknown tool 'drop_table'. Available tools: get_table_names, get_table_info, sql_query, calculator"),
    ("sql_query", {}, "missing ['query']"),
    ("sql_query", {"query": 5}, "not a string: ['query']"),
    ("sql_query", {"query": "SELECT 1", "limit": 3}, "unexpected ['limit']"),
    ("get_table_names", {"verbose": True}, "get_table_names takes (no arguments)"),
    ("get_table_info", {"table": "x"}, "missing ['table_name']; unexpected ['table']"),
    ("calculator", {"expression": "__import__('os').system('ls')"}, "unsupported expression element"),
    ("calculator", {"expression": "1/0"}, "division by zero"),
    # the plan-trained model's most common failure (31 of 80 test episodes of one run): the plan's letters passed on
    ("calculator", {"expression": "(b - a) / a * 100"}, "'b' is not a number; the calculator takes numbers only: "
                                                         "write the value your query returned in place of 'b'"),
    ("calculator", {"expression": "9 ** 9999"}, "too large"),
    ("sql_query", "SELECT 1", "must be a JSON object"),
])
def test_malformed_calls_are_messages(db, name, args, fragment):
    with SQLEnv(db) as env:
        out = env.call(name, args)
        assert out.startswith("Error") and fragment in out, out


def test_tool_schemas_are_openai_function_format():
    for t in TOOLS:
        f = t["function"]
        assert t["type"] == "function" and f["parameters"]["type"] == "object"
        assert set(f["parameters"]["required"]) <= set(f["parameters"]["properties"])


def test_calculator():
    assert calculate("1,234.5 + 765.5") == 2000.0
    assert calculate("25%") == 0.25
    assert calculate("((150/120) ** (1/3) - 1) * 100") == pytest.approx(7.7217345, rel=1e-6)
    assert calculate("round(2/3, 2)") == 0.67
    assert calculate("−5 × 2") == -10.0


# --- grading: (answer text, gold, kwargs, expected) ------------------------------------------------------------------

GRADES = [
    ("FINAL ANSWER: 25", 25, {}, 1),
    ("FINAL ANSWER: 25.0", 25, {}, 1),
    ("FINAL ANSWER: 25.004", 25, {}, 1),
    ("FINAL ANSWER: 25.03", 25, {}, 0),  # tolerance max(0.01, 0.025)
    ("FINAL ANSWER: $1,234.5", 1234.5, {}, 1),
    ("FINAL ANSWER: 1234.6", 1234.5, {}, 1),  # within 1e-3 relative
    ("FINAL ANSWER: 1236", 1234.5, {}, 0),
    ("FINAL ANSWER: (35)", -35, {}, 1),
    ("FINAL ANSWER: ($35.2)", -35.2, {}, 1),
    ("FINAL ANSWER: −12.5", -12.5, {}, 1),
    ("FINAL ANSWER: -12.5", 12.5, {}, 0),
    ("FINAL ANSWER: -12.5", 12.5, {"sign_insensitive": True}, 1),
    ("FINAL ANSWER: 17.7%", 17.7, {"unit": "%"}, 1),
    ("FINAL ANSWER: 0.177", 17.7, {"unit": "%"}, 1),  # a fraction for a percent question
    ("FINAL ANSWER: 0.177", 17.7, {}, 0),  # not for an amount
    ("FINAL ANSWER: 17.7 percent", 17.7, {"unit": "%"}, 1),
    ("FINAL ANSWER: 1.77%", 17.7, {"unit": "%"}, 0),
    ("FINAL ANSWER: $1.2345 billion", 1234.5, {"scale": 1e6}, 1),
    ("FINAL ANSWER: 1,234.5 million", 1234.5, {"scale": 1e6}, 1),
    ("FINAL ANSWER: $1.2 billion", 1234.5, {"scale": 1e6}, 0),
    ("FINAL ANSWER: 1234.5 thousand", 1234.5, {"scale": 1e6}, 0),
    ("FINAL ANSWER: 2.5x", 2.5, {"unit": "x"}, 1),
    ("FINAL ANSWER: 2.50 times", 2.5, {}, 1),
    ("FINAL ANSWER: 0.03", 0.03, {}, 1),
    ("FINAL ANSWER: 0.035", 0.03, {}, 1),  # the 0.01 absolute floor
    ("FINAL ANSWER: 0.05", 0.03, {}, 0),
    ("FINAL ANSWER: 12,345 employees", 12345, {}, 1),
    ("FINAL ANSWER: US$ 3.1", 3.1, {}, 1),
    ("FINAL ANSWER: €4,000", 4000, {}, 1),
    ("FINAL ANSWER: 1.30 (1)", 1.3, {}, 1),  # trailing footnote
    ("Revenue grew. final answer: 7.72%", 7.72, {"unit": "%"}, 1),
    ("FINAL ANSWER: 7.7%", 7.72, {"unit": "%"}, 0),  # rounding too coarse is wrong
    ("The answer is 25", 25, {}, 0),  # no FINAL ANSWER marker
    ("FINAL ANSWER: about twenty", 20, {}, 0),
    ("FINAL ANSWER:", 1, {}, 0),
    ("FINAL ANSWER: 2019", 2019, {"answer_type": "year"}, 1),
    ("FINAL ANSWER: 2019.4", 2019, {"answer_type": "year"}, 0),
    ("FINAL ANSWER: 2018", 2019, {"answer_type": "year"}, 0),
    ("FINAL ANSWER: 3", 3, {"answer_type": "count"}, 1),
    ("FINAL ANSWER: 4", 3, {"answer_type": "count"}, 0),
    ("FINAL ANSWER: Cloud Services", "cloud  services", {"answer_type": "text"}, 1),
    ("FINAL ANSWER: Devices", "Cloud Services", {"answer_type": "text"}, 0),
    ("FINAL ANSWER: 10\nFINAL ANSWER: 12", 12, {}, 1),  # the last marker counts
    ("FINAL ANSWER: **42.0**", 42, {}, 1),
]


@pytest.mark.parametrize("text,gold,kw,want", GRADES)
def test_grade(text, gold, kw, want):
    assert grade(text, gold, **kw) == want


def test_parse_number_forms():
    assert parse_number("(1,234.5)").value == -1234.5
    p = parse_number("$2.5 bn")
    assert (p.value, p.scale) == (2.5, 1e9)
    assert parse_number("35%").percent and parse_number("no digits") is None


# --- rubric -----------------------------------------------------------------------------------------------------------


def test_rubric_guessing_then_recovering(db):
    """The 235B model's failure: guess a table, fail, then answer anyway; and the trained model's behavior."""
    with SQLEnv(db) as env:
        env.call("sql_query", {"query": "SELECT revenue FROM financials"})
        env.call("sql_query", {"query": "SELECT revenue FROM income_data"})
        bad = rubric(env.log, "FINAL ANSWER: 130", turns=3, max_turns=8)
    assert bad["guessed_table_or_column"] and bad["hallucinated"] and bad["sql_errors"] == 2
    assert not bad["listed_tables_first"] and not bad["schema_before_query"] and not bad["recovered_from_error"]
    with SQLEnv(db) as env:
        env.call("get_table_names", {})
        env.call("get_table_info", {"table_name": "income_statement"})
        env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE itm = 'Total revenue'"})
        env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Total revenue'"})
        good = rubric(env.log, "FINAL ANSWER: 125", turns=5, max_turns=8)
    assert good["listed_tables_first"] and good["schema_before_query"] and good["recovered_from_error"]
    assert not good["hallucinated"] and good["sql_errors"] == 1 and good["guessed_table_or_column"]
    with SQLEnv(db) as env:
        env.call("get_table_names", {})
        env.call("sql_query", {"query": "SELECT y2023 FROM income_statement"})  # no schema look first
        r = rubric(env.log, "no answer", turns=8, max_turns=8, format_errors=2)
    assert not r["schema_before_query"] and r["hit_turn_limit"] and not r["answered"] and r["format_errors"] == 2


def test_rubric_repeated_call(db):
    """The loop that runs a small model into the turn limit: a query finds no rows, then the same calculator call on
    the plan's letters fails again and again. A query with other whitespace is another string, so not a repeat; the
    same arguments in another key order are one."""
    with SQLEnv(db) as env:
        env.call("get_table_names", {})
        env.call("sql_query", {"query": "SELECT x FROM big WHERE x = -1"})
        env.call("calculator", {"expression": "a / b"})
        fresh = rubric(env.log, "", turns=4, max_turns=8)
        env.call("sql_query", {"query": "SELECT x FROM big WHERE  x = -1"})
        still_fresh = rubric(env.log, "", turns=5, max_turns=8)
        env.call("calculator", {"expression": "a / b"})
        looped = rubric(env.log, "", turns=6, max_turns=8)
    assert not fresh["repeated_call"] and not still_fresh["repeated_call"] and looped["repeated_call"]
    assert fresh["gave_up_after_empty"] and looped["gave_up_after_empty"]  # the empty result, then the calculator
    with SQLEnv(db) as env:  # a failed call with wrong keys, twice: the same (name, arguments) pair
        env.call("get_table_info", {"table_name": "big", "x": "1"})
        env.call("get_table_info", {"x": "1", "table_name": "big"})
        assert rubric(env.log, "", turns=3, max_turns=8)["repeated_call"]


def test_repeat_note_only_on_a_call_sent_before(db):
    """With repeat_note a call identical to an earlier one (the same name and arguments, key order aside) returns what
    SQLite returns plus a note naming the earlier call; a call that differs in any argument, or one first sent, gets
    SQLite's result alone; without the flag nothing is added."""
    q = "SELECT y2023 FROM income_statement WHERE item = 'Net income'"
    with SQLEnv(db) as plain, SQLEnv(db, repeat_note=True) as env:
        first = env.call("sql_query", {"query": q})
        assert first == plain.call("sql_query", {"query": q}) == "y2023\n12.5"
        env.call("get_table_info", {"table_name": "big"})
        again = env.call("sql_query", {"query": q})
        assert again.startswith(first + "\nNote: this call is the same as your call 1 ")
        assert plain.call("sql_query", {"query": q}) == first
        assert env.call("sql_query", {"query": q.replace("2023", "2022")}) == "y2022\n10"
        assert env.call("get_table_info", {"table_name": "BIG"}).count("Note:") == 0  # other arguments: a new call
        bad = env.call("get_table_info", {"x": "1", "table_name": "big"})
        assert "call 6" in env.call("get_table_info", {"table_name": "big", "x": "1"}) and "Note" not in bad
        assert "call 2" in env.call("get_table_info", {"table_name": "big"})


def test_rubric_wrong_table_then_recovering(db):
    """The small model's failure: open a table that lacks the row, get no rows, then (trained) look elsewhere."""
    gold = ["income_statement"]
    with SQLEnv(db) as env:
        env.call("get_table_names", {})
        env.call("get_table_info", {"table_name": "big"})
        assert env.call("sql_query", {"query": "SELECT x FROM big WHERE x = -1"}) == "(no rows)"
        stuck = rubric(env.log, "FINAL ANSWER: 0", turns=4, max_turns=8, gold_tables=gold)
        env.call("get_table_info", {"table_name": "INCOME_STATEMENT"})  # resolved to the real name
        env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Net income'"})
        found = rubric(env.log, "FINAL ANSWER: 12.5", turns=6, max_turns=8, gold_tables=gold)
    assert not stuck["first_table_right"] and not stuck["read_gold_tables"] and not stuck["recovered_from_wrong_table"]
    assert not found["first_table_right"] and found["read_gold_tables"] and found["recovered_from_wrong_table"]
    assert stuck["gave_up_after_empty"] and not found["gave_up_after_empty"]  # answered at once / looked elsewhere
    with SQLEnv(db) as env:
        env.call("get_table_info", {"table_name": "income_statement"})
        env.call("sql_query", {"query": "SELECT * FROM income_statement i JOIN big b ON b.x = i.row_idx"})
        straight = rubric(env.log, "FINAL ANSWER: 1", turns=3, max_turns=8, gold_tables=gold)
        no_gold = rubric(env.log, "FINAL ANSWER: 1", turns=3, max_turns=8)
    assert straight["first_table_right"] and straight["read_gold_tables"] and not straight["recovered_from_wrong_table"]
    assert "read_gold_tables" not in no_gold
    # rates over the episodes that have an entry: 2 of 3 read the gold tables; all 4 answered
    rates = rubric_rates([stuck, found, straight, no_gold])
    assert rates["read_gold_tables"] == pytest.approx(2 / 3) and rates["answered"] == 1.0


def test_empty_result_names_the_string_no_row_holds(db):
    """A query that finds no rows because of a label no row has says which string and which labels are near it. The
    check is SQLite itself: the label the message offers finds the row, and a string the table does hold gets no
    note (the empty result then has another cause)."""
    with SQLEnv(db) as env:
        q = "SELECT y2023 FROM income_statement WHERE item = '{}'"
        out = env.call("sql_query", {"query": q.format("Total net income (y2023)")})
        assert out.startswith("(no rows)\nNo row of income_statement holds 'Total net income (y2023)'. Closest: ")
        offered = out.split("Closest: ")[1].split("'")[1]
        assert env.call("sql_query", {"query": q.format(offered)}) == "y2023\n12.5"
        assert "Closest: 'Net income'" in env.call("sql_query", {"query": q.format("net income")})  # = is case-sensitive
        # nothing near it: the row labels get_table_info lists, under the table's name
        out = env.call("sql_query", {"query": q.format("Goodwill")})
        info = env.call("get_table_info", {"table_name": "income_statement"})
        labels = info.split("Row labels (section / item): ")[1]
        assert out == ("(no rows)\nNo row of income_statement holds 'Goodwill'.\n"
                       f"Row labels of income_statement (section / item): {labels}")
        # every string is there, a number is no label, a LIKE pattern is a pattern, and a failed call is an error
        assert env.call("sql_query", {"query": "SELECT * FROM income_statement WHERE item = 'Net income' AND y2023 > 1e9"}) == "(no rows)"
        assert env.call("sql_query", {"query": "SELECT * FROM income_statement WHERE y2023 = '1,000.5'"}) == "(no rows)"
        assert env.call("sql_query", {"query": "SELECT * FROM income_statement WHERE item LIKE '%goodwill%'"}) == "(no rows)"
        assert env.call("sql_query", {"query": "SELECT x FROM big WHERE x = -1"}) == "(no rows)"  # no text cells
        assert [c.ok for c in env.log].count(False) == 0


def test_empty_result_says_which_other_table_holds_the_label(db):
    """The usual miss: the right label in the wrong table. The note names the table that holds it (exactly, in any
    case, or nearly), and querying that table with the label it gives finds the row in SQLite."""
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE cash_flow (row_idx INTEGER, section TEXT, item TEXT, y2022 REAL, y2023 REAL)")
    conn.execute("INSERT INTO cash_flow VALUES (0, 'Operating', 'Depreciation and amortization', 3.0, 4.5)")
    conn.commit()
    conn.close()
    with SQLEnv(db) as env:
        for asked in ("Depreciation and amortization", "depreciation and amortization", "Depreciation & amortization"):
            out = env.call("sql_query", {"query": f"SELECT y2023 FROM income_statement WHERE item = '{asked}'"})
            assert out == (f"(no rows)\nNo row of income_statement holds '{asked}'. "
                           "Found in cash_flow: 'Depreciation and amortization'.")
            table, label = out.split("Found in ")[1].rstrip(".").split(": ")
            assert env.call("sql_query", {"query": f"SELECT y2023 FROM {table} WHERE item = {label}"}) == "y2023\n4.5"
        # a label in no table still gets this table's closest labels
        out = env.call("sql_query", {"query": "SELECT y2023 FROM cash_flow WHERE item = 'Net incme'"})
        assert out == "(no rows)\nNo row of cash_flow holds 'Net incme'. Found in income_statement: 'Net income'."
        out = env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Total revenues 2023'"})
        assert out.startswith("(no rows)\nNo row of income_statement holds 'Total revenues 2023'. Closest: 'Total revenue'")


def test_empty_result_prefers_the_label_in_the_table_it_read(db):
    """A label both tables hold, asked of one in another case or a near wording, is named in the table that was read,
    not sent to the other: a note that sends an agent to the other table, whose own note sends it back, loops it to
    the turn limit (seen in evaluation: 'Net property, plant and equipment' between a balance sheet and the fixed-
    asset table, both holding 'Property, plant and equipment, net'). The offered label finds the row in SQLite."""
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE cash_flow (row_idx INTEGER, section TEXT, item TEXT, y2022 REAL, y2023 REAL)")
    conn.executemany("INSERT INTO cash_flow VALUES (?,?,?,?,?)",
                     [(0, "Operating", "Net income", 10.0, 12.5), (1, "Operating", "Total revenue", 0.0, 0.0)])
    conn.commit()
    conn.close()
    with SQLEnv(db) as env:
        for table in ("income_statement", "cash_flow"):
            for asked, offered in (("net income", "Net income"), ("Total revenues", "Total revenue")):
                q = f"SELECT y2023 FROM {table} WHERE item = '{{}}'"
                out = env.call("sql_query", {"query": q.format(asked)})
                assert out == f"(no rows)\nNo row of {table} holds '{asked}'. Closest: '{offered}'."
                assert env.call("sql_query", {"query": q.format(offered)}).startswith("y2023\n")


def test_a_repeated_query_reads_and_answers_as_the_first(db):
    """sqlite3 reuses a prepared statement for the same SQL text, and SQLite calls the authorizer (which records the
    tables a query reads) only when it prepares one: a repeated query was credited with no table, and its empty
    result lost its note. Each call now prepares its statement."""
    q = "SELECT y2023 FROM income_statement WHERE item = 'Net incme'"
    with SQLEnv(db) as env:
        first, second = env.call("sql_query", {"query": q}), env.call("sql_query", {"query": q})
        env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Net income'"})
        env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Net income'"})
    assert first == second and "Closest: 'Net income'" in first
    assert [c.tables for c in env.log] == [["income_statement"]] * 4


def test_rubric_empty_result_and_recovery(db):
    """An empty result is recorded on the call (the rows SQLite returned), and a recovery is a later query that
    found rows; a later error or another empty result is none. Episodes without an empty result have no recovery
    entry, so its rate is over the episodes that needed one."""
    q = "SELECT y2023 FROM income_statement WHERE item = '{}'"
    with SQLEnv(db) as env:
        env.call("sql_query", {"query": q.format("Net income")})  # rows: before the empty one, so no recovery
        env.call("sql_query", {"query": q.format("Total net income")})
        env.call("sql_query", {"query": q.format("Net incme")})
        env.call("sql_query", {"query": "SELECT nope FROM income_statement"})
        stuck = rubric(env.log, "FINAL ANSWER: 0", turns=5, max_turns=8)
        env.call("sql_query", {"query": q.format("Net income")})
        fixed = rubric(env.log, "FINAL ANSWER: 12.5", turns=6, max_turns=8)
    assert [c.empty for c in env.log] == [False, True, True, False, False] and not env.log[3].ok
    assert stuck["empty_result"] and not stuck["recovered_from_empty"]
    assert fixed["empty_result"] and fixed["recovered_from_empty"]
    # an answer on top of the empty results (the error after them found nothing either) came from nowhere; after
    # the recovery it did not, and with no answer there is nothing to count
    assert stuck["answered_after_empty"] and not stuck["hallucinated"]
    assert not fixed["answered_after_empty"] and not rubric(env.log[:4], "no answer", 5, 8)["answered_after_empty"]
    with SQLEnv(db) as env:
        env.call("sql_query", {"query": q.format("Net income")})
        clean = rubric(env.log, "FINAL ANSWER: 12.5", turns=2, max_turns=8)
    assert not clean["empty_result"] and "recovered_from_empty" not in clean and not clean["answered_after_empty"]
    assert rubric_rates([stuck, fixed, clean])["recovered_from_empty"] == 0.5


def test_rubric_took_the_fix_the_note_named(db):
    """After the first empty result whose note named labels in the table read (near ones, or the row labels when
    nothing was near): did the next query ask for one of them, in any case (used_near_label)? After the first that
    named another table holding the label: did the next query ask that table for it (went_to_named_table)? Each
    entry exists only where such a note came. The labels recorded are the ones the note printed."""
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE cash_flow (row_idx INTEGER, section TEXT, item TEXT, y2022 REAL, y2023 REAL)")
    conn.execute("INSERT INTO cash_flow VALUES (0, 'Operating', 'Depreciation and amortization', 3.0, 4.5)")
    conn.commit()
    conn.close()
    inc, cf = "income_statement", "cash_flow"
    cases = [  # (queries as (table, label), used_near_label, went_to_named_table)
        ([(inc, "Total net income"), (inc, "Net income")], True, None),
        ([(inc, "Total net income"), (cf, "NET INCOME")], True, False),  # any case, any table (whose note names inc)
        ([(inc, "Total net income"), (inc, "Total net income")], False, None),  # the same query again
        ([(inc, "Total net income"), (inc, "Net profit"), (inc, "Net income")], False, None),  # the next one only
        ([(inc, "Total net income")], False, None),  # no query after it
        ([(inc, "Goodwill"), (inc, "Total revenue")], True, None),  # one of the row labels listed
        ([(inc, "Depreciation & amortization"), (cf, "Depreciation and amortization")], None, True),
        ([(inc, "Depreciation and amortization"), (inc, "Depreciation and amortization")], None, False),  # same table
        ([(inc, "Depreciation and amortization"), (cf, "Depreciation and amortization"), (cf, "D&A"),
          (cf, "D and A"), (cf, "Depreciation and amortization")], False, True),  # the first note of each kind
        ([(inc, "Net income")], None, None),  # rows: nothing to fix
    ]
    for queries, near, named in cases:
        with SQLEnv(db) as env:
            outs = [env.call("sql_query", {"query": f"SELECT y2023 FROM {t} WHERE item = '{x}'"}) for t, x in queries]
            r = rubric(env.log, "no answer", turns=len(queries), max_turns=8)
        assert (r.get("used_near_label"), r.get("went_to_named_table")) == (near, named), (queries, outs)
        for out, c in zip(outs, env.log):  # every label recorded is in the note as printed, with its table if named
            assert bool(c.offered) == out.startswith("(no rows)\n")
            assert all((f"{t}: '{v}'" if t else f"'{v}'") in out or (not t and f" {v};" in out + ";") for t, v in c.offered)
    with SQLEnv(db) as env:  # a LIKE pattern gets no note, so nothing was offered
        env.call("sql_query", {"query": "SELECT * FROM income_statement WHERE item LIKE '%goodwill%'"})
        env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Net income'"})
    r = rubric(env.log, "FINAL ANSWER: 12.5", 2, 8)
    assert "used_near_label" not in r and "went_to_named_table" not in r and r["recovered_from_empty"]


def test_compare_table_shows_an_entry_one_report_lacks(db, capsys):
    """eval.py --compare: a checkpoint whose episodes never met an empty result has no recovery rate; its column
    shows '-' there instead of the table failing on the missing key."""
    from eval import print_model_table
    with SQLEnv(db) as env:
        env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Net incme'"})
        env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Net income'"})
        recovered = rubric(env.log, "FINAL ANSWER: 12.5", turns=3, max_turns=8)
    with SQLEnv(db) as env:
        env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Net income'"})
        straight = rubric(env.log, "FINAL ANSWER: 12.5", turns=2, max_turns=8)
    reps = [{"ckpt": name, "samples": 0, "greedy": 1.0, "by_kind": {}, "rubric": rubric_rates([r]), "mean_turns": 2,
             "mean_tokens": 99} for name, r in (("straight", straight), ("recovered", recovered))]
    print_model_table(reps)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("rubric: recovered_from_empty"))
    assert line.split()[2:] == ["-", "1.000"]


def test_eval_noise_rows_hand_computed(capsys):
    """eval.py's standard errors over tasks and paired differences, against values computed by hand: scores a = 1 0 0 1
    and b = 1 1 0 1 on the same four tasks. SE(a) = sqrt((4 x 0.25 / 3) / 4) = 0.2887; SE(b) = sqrt((3 x 0.0625 +
    0.5625) / 3 / 4) = 0.25; b - a = 0 1 0 0, mean 0.25, SE sqrt((3 x 0.0625 + 0.5625) / 3 / 4) = 0.25."""
    from eval import paired_diff, print_model_table, std_err
    a, b = [1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]
    assert abs(std_err(a) - (1 / 12) ** 0.5) < 1e-12 and abs(std_err(b) - 0.25) < 1e-12 and std_err([1.0]) == 0.0
    assert paired_diff(a, b) == (0.25, 0.25)
    with pytest.raises(ValueError, match="same tasks"):
        paired_diff(a, b[:3])
    reps = [{"ckpt": name, "samples": 4, "greedy": sum(x) / 4, "pass@1": sum(x) / 4, "pass@4": 1.0, "by_kind": {},
             "rubric": {}, "mean_turns": 2, "mean_tokens": 99, "per_task": {"pass@1": x}} for name, x in (("a", a), ("b", b))]
    print_model_table(reps)
    out = {ln[:34].strip(): ln[34:].split() for ln in capsys.readouterr().out.splitlines()}
    assert out["pass@1: standard error"] == ["0.289", "0.250"]
    assert out["pass@1: minus the first column"] == ["-", "+0.250"]
    assert out["pass@1:   its paired std. error"] == ["-", "0.250"]
    assert out["pass@1:   tasks up / down"] == ["-", "1", "/", "0"]  # task 2 went 0 -> 1, none went down
    assert "greedy: standard error" not in out  # no per-task greedy scores in these reports: no row


def test_ungrounded_answer_covers_every_way_of_not_reading_the_number(db):
    """The seed's failure, "invented an answer": a final number that is neither a value SQLite returned nor a
    calculation over such values. Grounded: the cell as read (12.5), rounded (13), as a percent of a fraction the
    calculator made from read cells (25% = (125 - 100) / 100), in another scale word; a whole-number constant (100)
    or a power of ten in the expression is allowed. Ungrounded: no query, an empty result, a read cell misquoted,
    the calculator over numbers typed in, and a number read only from the question."""
    q = "SELECT {} FROM income_statement WHERE item = '{}'"
    with SQLEnv(db) as env:
        env.call("sql_query", {"query": q.format("y2022, y2023", "Total revenue")})  # 100, 125
        env.call("sql_query", {"query": q.format("y2023", "Net income")})  # 12.5
        env.call("calculator", {"expression": "(125.0 - 100.0) / 100 * 100"})  # read cells and the constant 100
        env.call("calculator", {"expression": "125 * 1000"})  # a change of units
        env.call("sql_query", {"query": q.format("y2023", "Gross margin")})  # no rows
        env.call("calculator", {"expression": "(140 - 100) / 100"})  # 140 was never read: 0.4 is not grounded
    assert [c.values for c in env.log[:2]] == [[100.0, 125.0], [12.5]] and env.log[4].empty and env.log[4].values == []
    log = env.log
    for answer in ["FINAL ANSWER: 12.5", "FINAL ANSWER: 13", "FINAL ANSWER: $125 million", "FINAL ANSWER: 25%",
                   "FINAL ANSWER: 0.25", "FINAL ANSWER: 125,000", "FINAL ANSWER: 0.125 billion", "FINAL ANSWER: -12.5"]:
        assert answer_grounded(answer, log), answer
        assert not rubric(log, answer, 7, 8)["ungrounded_answer"]
    for answer in ["FINAL ANSWER: 12.4", "FINAL ANSWER: 40%", "FINAL ANSWER: 0.4", "FINAL ANSWER: 126",
                   "FINAL ANSWER: 2023"]:  # 0.4 / 40%: the calculator over an unread 140; 2023 is in the question
        assert answer_grounded(answer, log) is False, answer
        assert rubric(log, answer, 7, 8)["ungrounded_answer"]
    assert answer_grounded("FINAL ANSWER: 12.5", []) is False  # no query at all (also `hallucinated`)
    assert answer_grounded("FINAL ANSWER: 12.5", log[4:5]) is False  # only an empty result
    assert answer_grounded("FINAL ANSWER: 0.25", log[2:3]) is False  # a calculation over typed numbers
    # no number: nothing to ground, yet an answer that is not a read number (every task's answer is a number), so
    # "unknown" is no way around the entry; no answer at all is not an answer
    assert answer_grounded("FINAL ANSWER: unknown", log) is None and answer_grounded("no answer", log) is None
    assert rubric(log, "FINAL ANSWER: unknown", 7, 8)["ungrounded_answer"]
    assert not rubric(log, "no answer", 7, 8)["ungrounded_answer"]


def test_empty_result_says_the_string_is_in_another_column(tmp_path):
    """'Revenue' asked as an item finds nothing when it is a section heading: the string is in the table, so no near
    label is offered, and the bare '(no rows)' said nothing. The note names the column that holds it and the compared
    column's values on those rows; SQLite finds each offered item, and the rows it names are the section's rows."""
    path = str(tmp_path / "sections.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE income_statement (row_idx INTEGER, section TEXT, item TEXT, y2023 REAL)")
        conn.executemany("INSERT INTO income_statement VALUES (?,?,?,?)",
                         [(0, "Revenue", "Product revenue", 80.0), (1, "Revenue", "Total revenue", 125.0),
                          (2, "Owners' equity", "Retained earnings", 40.0), (3, "", "Net income", 12.5)])
    with SQLEnv(path) as env:
        out = env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Revenue'"})
        assert out == ("(no rows)\nNo row of income_statement has item = 'Revenue'; it is the section of the rows with "
                       "item 'Product revenue', 'Total revenue'.")
        assert env.log[-1].offered == [[None, "Product revenue"], [None, "Total revenue"]]
        with sqlite3.connect(path) as conn:
            assert [r[0] for r in conn.execute("SELECT item FROM income_statement WHERE section = 'Revenue'")] == \
                ["Product revenue", "Total revenue"]
        for _, label in env.log[-1].offered:
            q = f"SELECT y2023 FROM income_statement WHERE item = '{label}'"
            assert env.call("sql_query", {"query": q}).startswith("y2023\n")
        # quoted column, '==', a quote in the string, and the other way round (an item asked as a section)
        out = env.call("sql_query", {"query": "SELECT * FROM income_statement WHERE \"item\" == 'Owners'' equity'"})
        assert out.endswith("it is the section of the rows with item 'Retained earnings'.")
        out = env.call("sql_query", {"query": "SELECT * FROM income_statement WHERE section = 'Net income'"})
        assert out == "(no rows)\nNo row of income_statement has section = 'Net income'; it is in column item."
        # the string is where it was asked for: another condition emptied the result, and the note stays out of it
        q = "SELECT y2023 FROM income_statement WHERE section = 'Revenue' AND y2023 > 1000"
        assert env.call("sql_query", {"query": q}) == "(no rows)"
        assert env.call("sql_query", {"query": "SELECT * FROM income_statement WHERE item LIKE 'Revenue'"}) == "(no rows)"


def test_a_long_table_listing_names_every_table(tmp_path):
    """A company with a hundred XBRL-named tables (rLLM's FinQA has such): the listing with descriptions is over the
    observation cap, and a cut listing would hide tables no query can find. It gives every name instead, uncut even
    when the names alone are over the cap. A short listing keeps its descriptions (the test above)."""
    path = str(tmp_path / "tenk.db")
    conn = sqlite3.connect(path)
    names = [f"us_gaap_ScheduleOfSomethingNumber{i:03d}TableTextBlock" for i in range(100)]
    for n in names:
        conn.execute(f"CREATE TABLE {n} (row_idx INTEGER, item TEXT, y2023 REAL)")
    conn.execute("CREATE TABLE _catalog (table_name TEXT, column_name TEXT, description TEXT, unit TEXT)")
    conn.executemany("INSERT INTO _catalog VALUES (?, '', ?, '')", [(n, "a schedule of " + "x" * 40) for n in names])
    conn.commit()
    conn.close()
    with SQLEnv(path, max_chars=3000) as env:
        out = env.call("get_table_names", {})
        assert out.split("\n") == names + ["(get_table_info describes a table)"] and len(out) > 3000
        assert "a schedule of" in env.call("get_table_info", {"table_name": names[99]})
    with SQLEnv(path, max_chars=20_000) as env:  # under the cap: the usual listing, descriptions and all
        assert env.call("get_table_names", {}).split("\n")[0] == f"{names[0]}: a schedule of " + "x" * 40
