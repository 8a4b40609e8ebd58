"""
The SQLite tool environment: one read-only, bounded database per episode, the four tools an agent may call,
the grader of its final answer and the behavior rubric read off its tool-call log.

    env = SQLEnv("data/generated/synth/dbs/acme.db")
    env.call("get_table_names", {})            # -> str, never raises
    env.call("sql_query", {"query": "SELECT y2023 FROM income_statement WHERE item = 'Revenue'"})
    grade("FINAL ANSWER: $1,234.5 million", gold=1234.5)   # -> 1 or 0
    rubric(env.log, answer_text, turns=5, max_turns=8)

Safety is layered, each layer enough on its own for what it covers: the file is opened with mode=ro and
PRAGMA query_only; an authorizer allows reads and nothing else (no writes, ATTACH, VACUUM, state-changing
PRAGMA, load_extension); only one SELECT/WITH statement runs per call; a progress handler stops a query past its
time budget; setlimit bounds the size of any value; observations are capped in rows and characters.
"""
import ast
import difflib
import json
import math
import operator
import re
import sqlite3
import time
from dataclasses import dataclass, field

# What the tools say, as a number: evaluations under different versions are not comparable (eval.py --compare checks
# it). Bump it with any change to a tool's output text. 2: an empty result's note names a near label in the table read
# before one elsewhere. 3: a string compared to one column that another holds ('Revenue', a section, asked as an item)
# gets a note naming that column and the compared column's values on its rows. 4: a table listing longer than the
# observation cap gives every name, without descriptions, instead of being cut after the first few.
ENV_VERSION = 4
CATALOG = "_catalog"  # (table_name, column_name, description, unit); column_name '' describes the table

TOOLS = [
    {"type": "function", "function": {
        "name": "get_table_names",
        "description": "List the tables in the database, with a one-line description of each.",
        "parameters": {"type": "object", "properties": {}, "required": []}}},
    {"type": "function", "function": {
        "name": "get_table_info",
        "description": "Show a table's columns (type, unit, description), its row count and its row labels or a few sample rows.",
        "parameters": {"type": "object", "properties": {
            "table_name": {"type": "string", "description": "a name from get_table_names"}}, "required": ["table_name"]}}},
    {"type": "function", "function": {
        "name": "sql_query",
        "description": "Run one read-only SQLite SELECT query and return the rows.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "a single SELECT (or WITH ... SELECT) statement"}}, "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression: numbers, + - * / ** %, parentheses, abs, round, min, max, sqrt.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "e.g. (125.0 - 100.0) / 100.0 * 100"}}, "required": ["expression"]}}},
]
TOOL_ARGS = {t["function"]["name"]: t["function"]["parameters"]["required"] for t in TOOLS}

# authorizer action codes that a read needs; everything else is denied
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_ALLOWED_PRAGMAS = {"table_info", "table_xinfo"}
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}


@dataclass
class Call:
    """One tool call as the rubric sees it."""
    name: str
    arguments: dict
    ok: bool
    error: str = ""  # '' | unknown_tool | bad_arguments | unknown_table | unknown_column | sql_error | timeout | not_read_only | calc_error
    tables: list = field(default_factory=list)  # tables the call inspected or queried
    empty: bool = False  # a query that ran and found no rows
    values: list = field(default_factory=list)  # the numbers it returned: a query's numeric cells, a calculation's result
    # the row labels an empty result's note named, as [table, label]: table None for a label of the tables read
    offered: list = field(default_factory=list)


def sql_strings(query):
    """The string literals of a SQL query, unescaped: "item = 'Owners'' equity'" -> ["Owners' equity"]."""
    return [m.replace("''", "'") for m in re.findall(r"'((?:[^']|'')*)'", query)]


def sql_literal(v):
    """A value as a SQL string literal, the inverse of sql_strings: "Owners' equity" -> "'Owners'' equity'"."""
    return "'" + str(v).replace("'", "''") + "'"


class SQLEnv:
    def __init__(self, db_path, max_rows=30, max_chars=3000, time_budget_s=2.0, max_value_bytes=100_000,
                 sample_rows=3, max_labels=60, repeat_note=False):
        self.db_path, self.max_rows, self.max_chars = db_path, max_rows, max_chars
        self.repeat_note = repeat_note  # see call()
        self.time_budget_s, self.sample_rows, self.max_labels = time_budget_s, sample_rows, max_labels
        # cached_statements=0: SQLite runs the authorizer (which records the tables a query reads) only when it prepares
        # a statement, and sqlite3 would reuse the prepared one for a repeated query. Usable from the creating thread only.
        self.conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, cached_statements=0)
        self.conn.execute("PRAGMA query_only = ON")
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)  # randomblob(1e9) fails, not the machine
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        self._deadline = math.inf
        self.conn.set_progress_handler(lambda: int(time.monotonic() > self._deadline), 1000)
        self.tables = {}  # name -> [column names], catalog excluded
        for (name,) in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
            if not name.startswith(("_", "sqlite_")):  # _catalog, _raw_cells: metadata, not for the agent
                self.tables[name] = [r[1] for r in self.conn.execute(f'PRAGMA table_info("{name}")')]
        self.catalog = {}  # (table, column) -> (description, unit)
        if self._has_catalog():
            for t, c, d, u in self.conn.execute(f"SELECT table_name, column_name, description, unit FROM {CATALOG}"):
                self.catalog[(t, c or "")] = (d or "", u or "")
        self._reads = set()
        self.conn.set_authorizer(self._authorize)  # after our own set-up reads
        self.log: list[Call] = []
        self._sent = []  # (name, arguments as JSON) of every call, in order (repeat_note)

    def _has_catalog(self):
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (CATALOG,)).fetchone() is not None

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- safety -----------------------------------------------------------------------------------------------------

    def _authorize(self, action, arg1, arg2, db_name, trigger):
        if action == sqlite3.SQLITE_READ and arg1 in self.tables:
            self._reads.add(arg1)  # exactly the tables a query reads, whatever its syntax
        if action == sqlite3.SQLITE_PRAGMA:
            return sqlite3.SQLITE_OK if (arg1 or "").lower() in _ALLOWED_PRAGMAS else sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY

    def _run(self, sql, params=()):
        """Execute under the time budget; returns (column names, cursor)."""
        self._deadline = time.monotonic() + self.time_budget_s
        cur = self.conn.execute(sql, params)
        return [d[0] for d in cur.description or []], cur

    # --- the tools ----------------------------------------------------------------------------------------------------

    def call(self, name, arguments):
        """Run one tool call; every failure comes back as a short message the model can act on. With repeat_note, a
        call identical to an earlier one (name and arguments) says so after its result: the database is read-only and
        the calculator deterministic, so it can only return what it did before. Decoded greedily, a small model that
        sends a call again reads the same result again and loops into the turn limit (74 of 84 capped test episodes of
        a GRPO model did); a result that differs the second time looked like a way out of that loop. Measured, it was
        not: the model ignored the note, at test time and trained with it (bench/RESULTS.md), so it is off."""
        earlier = None
        if self.repeat_note:
            key = call_key(name, arguments)
            earlier = self._sent.index(key) if key in self._sent else None
            self._sent.append(key)
        out = self._dispatch(name, arguments)
        if earlier is not None:
            out += (f"\nNote: this call is the same as your call {earlier + 1} and returns the same. Send a different "
                    f"call: another table, column or label.")
        return out

    def _dispatch(self, name, arguments):
        if name not in TOOL_ARGS:
            return self._fail(name, arguments, "unknown_tool",
                              f"Error: unknown tool '{name}'. Available tools: {', '.join(TOOL_ARGS)}.")
        if not isinstance(arguments, dict):
            return self._fail(name, arguments, "bad_arguments", f"Error: arguments for {name} must be a JSON object.")
        required = TOOL_ARGS[name]
        missing = [k for k in required if k not in arguments]
        extra = [k for k in arguments if k not in required]
        wrong = [k for k in required if k in arguments and not isinstance(arguments[k], str)]
        if missing or extra or wrong:
            want = ", ".join(f"{k}: string" for k in required) or "no arguments"
            what = "; ".join(s for s in (missing and f"missing {missing}", extra and f"unexpected {extra}",
                                         wrong and f"not a string: {wrong}") if s)
            return self._fail(name, arguments, "bad_arguments", f"Error: {name} takes ({want}); {what}.")
        try:
            return getattr(self, name)(**arguments)
        except Exception as e:  # a bug in a tool must not stop a batch of episodes
            return self._fail(name, arguments, "sql_error", f"Error: {type(e).__name__}: {e}")

    def _fail(self, name, arguments, kind, message, tables=()):
        self.log.append(Call(name, arguments if isinstance(arguments, dict) else {}, False, kind, list(tables)))
        return message

    def _ok(self, name, arguments, text, tables=(), empty=False, values=(), offered=(), cap=True):
        self.log.append(Call(name, arguments, True, "", list(tables), empty, list(values), list(offered)))
        return self._cap(text) if cap else text

    def _cap(self, text):
        if len(text) <= self.max_chars:
            return text
        return text[: self.max_chars] + f"\n[truncated: {len(text) - self.max_chars} more characters]"

    def get_table_names(self):
        lines = []
        for t in self.tables:
            desc = self.catalog.get((t, ""), ("", ""))[0]
            lines.append(f"{t}: {desc}" if desc else t)
        text = "\n".join(lines) or "(the database has no tables)"
        if len(text) <= self.max_chars:
            return self._ok("get_table_names", {}, text)
        # A 10-K with a hundred tables (rLLM's FinQA): the listing is the one way to learn what exists and no query can
        # page through it, so it is never cut. Over the cap it gives the names alone, every one.
        return self._ok("get_table_names", {}, "\n".join(self.tables) + "\n(get_table_info describes a table)", cap=False)

    def get_table_info(self, table_name):
        args = {"table_name": table_name}
        t = self._resolve_table(table_name)
        if t is None:
            return self._fail("get_table_info", args, "unknown_table",
                              f"Error: no table named '{table_name}'. Tables: {', '.join(self.tables)}.")
        cols = list(self.conn.execute(f'PRAGMA table_info("{t}")'))
        desc, unit = self.catalog.get((t, ""), ("", ""))
        out = [f"Table {t}" + (f": {desc}" if desc else "") + (f" (unit: {unit})" if unit else "")]
        parts = []  # one line of columns: observations are paid for in tokens every turn after
        for _, cname, ctype, *_ in cols:
            cdesc, cunit = self.catalog.get((t, cname), ("", ""))
            extra = "; ".join(s for s in (cdesc, cunit != unit and cunit and f"unit: {cunit}") if s)
            parts.append(f"{cname} {ctype or ''}".rstrip() + (f" ({extra})" if extra else ""))
        out.append("Columns: " + ", ".join(parts))
        n = self._count(t)
        out.append(f"Rows: {n}")
        labels, rows = self._row_labels(t, n)[0], []
        if labels:  # financial tables: the row labels are what a query filters on
            out.append(labels)
        else:
            names, cur = self._run(f'SELECT * FROM "{t}" LIMIT {self.sample_rows}')
            rows = cur.fetchall()
            out.append("Sample rows:\n" + format_rows(names, rows))
        return self._ok("get_table_info", args, "\n".join(out), [t], values=numeric_cells(rows))

    def _count(self, t):
        return self._run(f'SELECT COUNT(*) FROM "{t}"')[1].fetchone()[0]

    def _row_labels(self, t, n, named=False):
        """-> (a financial table's row labels as one line, the item labels in it); ('', []) for a table without an item
        column. n: its row count (for the truncation note); named: say whose."""
        colnames = self.tables[t]
        if "item" not in colnames:
            return "", []
        label = "section, item" if "section" in colnames else "item"
        order = " ORDER BY row_idx" if "row_idx" in colnames else ""
        _, cur = self._run(f'SELECT {label} FROM "{t}"{order} LIMIT {self.max_labels}')
        rows = cur.fetchall()
        fmt = (lambda r: f"{r[0]} / {r[1]}" if r[0] else str(r[1])) if "section" in colnames else (lambda r: str(r[0]))
        head = "Row labels" + (f" of {t}" if named else "") + (" (section / item): " if "section" in colnames else ": ")
        more = f" [truncated: {n - len(rows)} more rows]" if n > len(rows) else ""
        return head + "; ".join(fmt(r) for r in rows) + more, [r[-1] for r in rows]

    def _resolve_table(self, name):
        if name in self.tables:
            return name
        low = {t.lower(): t for t in self.tables}
        return low.get(name.strip().strip('"`[]').lower())

    def sql_query(self, query):
        args = {"query": query}
        tables = self.tables_in(query)  # for a query that fails before SQLite reads anything
        sql = strip_sql(query)
        if not re.match(r"(?is)^(select|with)\b", sql):
            return self._fail("sql_query", args, "not_read_only",
                              "Error: only read-only SELECT (or WITH ... SELECT) queries are allowed.", tables)
        self._reads = set()
        try:
            names, cur = self._run(sql)
            tables = sorted(self._reads)
            rows = cur.fetchmany(self.max_rows)
            more, counted = 0, True
            try:  # count what is left without keeping it, still under the time budget
                while chunk := cur.fetchmany(1000):
                    more += len(chunk)
            except sqlite3.OperationalError:
                counted = False
        except sqlite3.Warning as e:  # e.g. two statements in one call
            return self._fail("sql_query", args, "sql_error", f"Error: {e}. Send one statement per call.", tables)
        except sqlite3.DatabaseError as e:
            return self._sql_error(args, str(e), tables)
        finally:
            self._deadline = math.inf
        note, offered = ("", []) if rows else self._why_empty(query, tables)
        text = format_rows(names, rows) if rows else "(no rows)" + note
        if more or not counted:
            text += f"\n[truncated: {more} more rows]" if counted else \
                f"\n[truncated: {more}+ more rows; counting stopped at the time budget]"
        return self._ok("sql_query", args, text, tables, empty=not rows, values=numeric_cells(rows), offered=offered)

    def _why_empty(self, query, tables):
        """For a query that found no rows: each string it compares that no text cell of the tables it read holds,
        with the labels closest to it (or, when none is close, the table's row labels). A small model's usual empty
        result is a label written from the question or its plan ('Total net income (y2024)') instead of the listing
        ('Net income'); naming the string and the nearest labels lets it fix the filter instead of guessing.
        -> (the note, the labels it offers as [table or None (the tables read), label]; the rubric asks whether the
        next query took one)."""
        strings = [x for x in dict.fromkeys(sql_strings(query))
                   if x.strip() and not re.search(r"[%_]", x) and not is_number(x)]
        if not strings or not tables:
            return "", []
        try:
            cells = {}  # lower-cased text cell -> the cell as stored
            for t in tables:
                cells.update(self._text_cells(t))
            others = None  # table -> its text cells, for the tables the query did not read (read when needed)
            notes, lost, offered = [], False, []
            for x in strings:
                if x in cells.values():  # the string is there: in another column than the one it was compared to?
                    note, labels = self._other_column(query, x, tables)
                    notes += [note] if note else []
                    offered += [[None, v] for v in labels]
                    continue  # or the empty result has another cause (a second condition, a year)
                # Where the row is, first match wins: this table in another case ('=' is case-sensitive); another
                # table, exactly in any case (the small model's usual miss is the wrong statement); this table,
                # nearly; another table, nearly. A near label here wins over one elsewhere: 'Net property, plant and
                # equipment' asked of a balance sheet that has 'Property, plant and equipment, net' was sent to the
                # fixed-asset table (which has it too), whose note sent it back, until the turn limit.
                close, found = [], []
                if x.lower() in cells:
                    close = [cells[x.lower()]]
                else:
                    if others is None:
                        others = {t: self._text_cells(t) for t in self.tables if t not in tables}
                    found = [(t, c[x.lower()]) for t, c in others.items() if x.lower() in c]
                    if not found:
                        close = [cells[k] for k in difflib.get_close_matches(x.lower(), list(cells), n=1, cutoff=0.85)]
                    if not found and not close:
                        found = [(t, c[k]) for t, c in others.items()
                                 for k in difflib.get_close_matches(x.lower(), list(c), n=1, cutoff=0.85)]
                if found:  # and then nothing about this table's labels, which would mislead
                    notes.append(f"No row of {' or '.join(tables)} holds '{x}'. Found in " +
                                 ", ".join(f"{t}: '{v}'" for t, v in found[:3]) + ".")
                    offered += [[t, v] for t, v in found[:3]]
                    continue
                close = close or [cells[k] for k in difflib.get_close_matches(x.lower(), list(cells), n=3, cutoff=0.5)]
                notes.append(f"No row of {' or '.join(tables)} holds '{x}'." +
                             (" Closest: " + ", ".join(f"'{v}'" for v in close) + "." if close else ""))
                offered += [[None, v] for v in close]
                lost = lost or not close
            if lost:  # nothing near it: show the labels there are
                for t in tables:  # and offer the labels printed, no more (a long table's are truncated)
                    line, items = self._row_labels(t, self._count(t), named=True)
                    notes += [line] if line else []
                    offered += [[None, v] for v in items]
        except sqlite3.DatabaseError:  # past the time budget: the bare result is still true
            return "", []
        finally:
            self._deadline = math.inf
        return "".join("\n" + n for n in notes), offered

    def _other_column(self, query, x, tables):
        """A string compared to one column that another column holds: 'Revenue' is a section of the income statement,
        not an item ("WHERE item = 'Revenue'" finds nothing, and without a note nothing says why). -> (the note naming
        the column that holds it and the compared column's values on those rows, those values), or ('', [])."""
        lit = sql_literal(x)
        m = re.search(r'"?([A-Za-z_]\w*)"?\s*==?\s*' + re.escape(lit), query)  # item = 'Revenue' ("item", ==)
        if not m:
            return "", []
        for t in tables:
            cols = {c.lower(): c for c in self.tables[t]}
            col = cols.get(m.group(1).lower())
            if col is None or self._run(f'SELECT 1 FROM "{t}" WHERE "{col}" = {lit} LIMIT 1')[1].fetchone():
                continue  # not this table's column, or it holds the string there (another condition emptied it)
            for other in self.tables[t]:
                if other == col or not self._run(f'SELECT 1 FROM "{t}" WHERE "{other}" = {lit} LIMIT 1')[1].fetchone():
                    continue
                order = " ORDER BY row_idx" if "row_idx" in cols else ""
                _, cur = self._run(f'SELECT DISTINCT "{col}" FROM "{t}" WHERE "{other}" = {lit} AND '
                                   f'typeof("{col}") = \'text\' AND "{col}" <> \'\'{order} LIMIT 6')
                values = [v for (v,) in cur.fetchall()]
                shown = ", ".join(f"'{v}'" for v in values[:5]) + (", ..." if len(values) > 5 else "")
                return (f"No row of {t} has {col} = {lit}; " + (f"it is the {other} of the rows with {col} {shown}."
                                                                 if values else f"it is in column {other}."), values[:5])
        return "", []

    def _text_cells(self, t):
        """Table t's distinct text cells (up to 500 per column): lower-cased -> as stored."""
        cells = {}
        for c in self.tables[t]:
            _, cur = self._run(f'SELECT DISTINCT "{c}" FROM "{t}" WHERE typeof("{c}") = \'text\' LIMIT 500')
            cells.update((v.lower(), v) for (v,) in cur.fetchall())
        return cells

    def _sql_error(self, args, msg, tables):
        m = re.search(r"no such table: (\S+)", msg)
        if m:
            return self._fail("sql_query", args, "unknown_table",
                              f"Error: no such table: {m.group(1)}. Tables: {', '.join(self.tables)}.", tables)
        m = re.search(r"no such column: (\S+)", msg)
        if m:
            known = [t for t in tables if t in self.tables] or list(self.tables)
            cols = "; ".join(f"{t}({', '.join(self.tables[t])})" for t in known)
            return self._fail("sql_query", args, "unknown_column", f"Error: no such column: {m.group(1)}. Columns: {cols}.", tables)
        if "interrupted" in msg:
            return self._fail("sql_query", args, "timeout",
                              f"Error: the query ran past its {self.time_budget_s:g} s budget and was stopped. Simplify it.", tables)
        if "not authorized" in msg or "readonly" in msg or "read-only" in msg:
            return self._fail("sql_query", args, "not_read_only", "Error: the database is read-only; only SELECT queries are allowed.", tables)
        return self._fail("sql_query", args, "sql_error", f"Error: {msg}", tables)

    def tables_in(self, query):
        """Tables a query names (FROM/JOIN targets and other mentions outside string literals), the missing ones
        included; successful queries are instead credited with exactly the tables SQLite read (the authorizer)."""
        query = re.sub(r"'(?:[^']|'')*'", "''", query)  # a string literal ('Goodwill') names no table
        words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", query)}
        named = [t for t in self.tables if t.lower() in words]
        for m in re.finditer(r"(?i)\b(?:from|join)\s+[\"`\[]?([A-Za-z_][A-Za-z0-9_]*)", query):
            if m.group(1) not in named and self._resolve_table(m.group(1)) is None:
                named.append(m.group(1))  # a table that does not exist: the rubric counts it as a guess
        return named

    def calculator(self, expression):
        args = {"expression": expression}
        try:
            value = calculate(expression)
        except (ValueError, ZeroDivisionError, OverflowError, SyntaxError, TypeError) as e:
            return self._fail("calculator", args, "calc_error", f"Error: {e}")
        return self._ok("calculator", args, format_number(value), values=[value])


def call_key(name, arguments):
    """What makes two tool calls the same call (repeat_note, the rubric's repeated_call): the name and the arguments,
    key order aside."""
    return name, json.dumps(arguments, sort_keys=True, default=str)


def strip_sql(query):
    """Drop comments and surrounding whitespace; a single trailing semicolon is allowed."""
    q = re.sub(r"--[^\n]*", " ", query)
    q = re.sub(r"/\*.*?\*/", " ", q, flags=re.S).strip()
    return q[:-1].rstrip() if q.endswith(";") else q


def is_number(text):
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def format_number(v):
    if isinstance(v, float):
        if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.10g}"
    return str(v)


def numeric_cells(rows):
    """The numbers among the cells of rows (numeric text cells included), as floats."""
    out = []
    for v in (v for r in rows for v in r):
        if isinstance(v, str) and is_number(v):
            v = float(v.replace(",", ""))
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def format_rows(names, rows):
    """Rows as compact text: a header line, then one line per row, cells separated by ' | '."""
    lines = [" | ".join(names)]
    for r in rows:
        lines.append(" | ".join("NULL" if v is None else format_number(v) if isinstance(v, (int, float)) else
                                (f"<blob {len(v)} bytes>" if isinstance(v, bytes) else str(v)) for v in r))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The episode's opening messages

SYSTEM_PROMPT = (
    "You are a financial analyst answering questions from a company's SQLite database of financial tables. "
    "Use the tools: first get_table_names, then get_table_info on the tables you need, then sql_query to read the "
    "exact values, and calculator for arithmetic. If a tool returns an error, fix the call and try again. Never guess "
    "a number you have not read from the database. When you are done, reply without a tool call and end with "
    "'FINAL ANSWER: <number>' (percentages in percent, amounts in the units the question implies).")


def task_messages(task, system_prompt=SYSTEM_PROMPT):
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": task["question"]}]


# -----------------------------------------------------------------------------
# Calculator: a small arithmetic parser over Python's ast, evaluated by hand (no eval).

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
_FUNCS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "log": math.log, "exp": math.exp}


def calculate(expression):
    if not isinstance(expression, str) or len(expression) > 500:
        raise ValueError("expression must be a string of at most 500 characters")
    expr = expression.replace("−", "-").replace("×", "*").replace("÷", "/").replace("^", "**")
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)  # 1,234.5 -> 1234.5
    expr = re.sub(r"(\d+(?:\.\d+)?)\s*%", r"(\1/100)", expr)  # 25% -> (25/100)
    tree = ast.parse(expr.strip(), mode="eval")

    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
            return float(n.value)
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            a, b = ev(n.left), ev(n.right)
            if isinstance(n.op, ast.Pow) and (abs(b) > 100 or abs(a) > 1e12):
                raise ValueError("exponent or base too large")
            return _BINOPS[type(n.op)](a, b)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            return -ev(n.operand) if isinstance(n.op, ast.USub) else ev(n.operand)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _FUNCS and not n.keywords:
            vals = [ev(a) for a in n.args]
            if n.func.id == "round" and len(vals) == 2:
                return float(round(vals[0], int(vals[1])))
            return float(_FUNCS[n.func.id](*vals))
        if isinstance(n, ast.Name):  # a plan's letter ("a / b") or a label: the model must put the value there
            raise ValueError(f"'{n.id}' is not a number; the calculator takes numbers only: write the value your "
                             f"query returned in place of '{n.id}'")
        raise ValueError(f"unsupported expression element: {ast.dump(n)[:60]}; use numbers, + - * / ** % and ( )")

    v = ev(tree.body)
    if isinstance(v, complex) or not math.isfinite(v):
        raise ValueError("the result is not a finite real number")
    return v


# -----------------------------------------------------------------------------
# Grading

_SCALES = {"thousand": 1e3, "thousands": 1e3, "k": 1e3, "million": 1e6, "millions": 1e6, "mn": 1e6, "m": 1e6,
           "billion": 1e9, "billions": 1e9, "bn": 1e9, "b": 1e9, "trillion": 1e12}
_NUM = re.compile(r"(\(?)\s*([-+−–]?)\s*(?:US\$|[A-Z]{1,3}\$|\$|€|£|¥)?\s*([-+−–]?)(\d[\d,]*(?:\.\d+)?|\.\d+)\s*(\)?)\s*"
                  r"(%|percent\b|per cent\b)?\s*(thousands?\b|millions?\b|billions?\b|trillion\b|mn\b|bn\b|[kmb]\b)?", re.I)


def final_answer(text):
    """The text after the last 'FINAL ANSWER:' (case-insensitive), or None."""
    if not text:
        return None
    idx = text.upper().rfind("FINAL ANSWER")
    if idx < 0:
        return None
    return text[idx + len("FINAL ANSWER"):].lstrip(" :*\t").split("\n")[0].strip() or None


@dataclass
class Parsed:
    value: float
    percent: bool
    scale: float  # the multiplier of a scale word (1.0 when none)
    resolution: float = 0.0  # half a unit of the last digit written: 0.05 for '12.3' (the rounding it may hide)


def parse_number(text):
    """The first number in text: $, commas, %, (x) negatives, unicode minus, million/billion words, trailing units."""
    if text is None:
        return None
    m = _NUM.search(text.replace("\u2212", "-"))
    if not m:
        return None
    open_paren, sign1, sign2, digits, close_paren, pct, scale = m.groups()
    v = float(digits.replace(",", ""))
    if (sign1 or sign2) in ("-", "−", "–") or (open_paren and close_paren):
        v = -v
    return Parsed(v, bool(pct), _SCALES.get((scale or "").lower(), 1.0), resolution(digits))


def resolution(digits):
    """'12.3' -> 0.05, '1,234' -> 0.5: half a unit of the last digit written."""
    return 0.5 * 10.0 ** -(len(digits) - digits.index(".") - 1 if "." in digits else 0)


def grade(answer, gold, answer_type="number", unit="", scale=1.0, rel_tol=1e-3, abs_tol=0.01, sign_insensitive=False):
    """1 if the final answer in `answer` matches gold, else 0.
    number: |pred - gold| <= max(abs_tol, rel_tol * |gold|) (../shared/notes/tatqa.md: accepts every correct value,
      the fewest wrong ones). gold is in the task's display units: `scale` (e.g. 1e6 for '$ millions') converts a
      prediction that carries its own scale word; for a percent task (unit '%') a bare fraction (0.177 for 17.7%)
      is accepted too. year/count: exact integer. text: case- and space-insensitive equality."""
    fa = final_answer(answer)
    if fa is None:
        return 0
    if answer_type == "text":
        norm = lambda s: re.sub(r"\s+", " ", str(s)).strip().lower().rstrip(".")
        return int(norm(fa) == norm(gold))
    p = parse_number(fa)
    if p is None:
        return 0
    if answer_type in ("year", "count"):
        return int(p.value == float(gold) and p.scale == 1.0)
    gold = float(gold)
    cands = [p.value * p.scale / scale if p.scale != 1.0 else p.value]
    if unit == "%" and not p.percent:
        cands.append(p.value * 100)
    tol = max(abs_tol, rel_tol * abs(gold))
    ok = any(abs(c - gold) <= tol or (sign_insensitive and abs(abs(c) - abs(gold)) <= tol) for c in cands)
    return int(ok)


def grade_task(task, answer):
    """grade() with a task's gold answer, type, unit, scale and sign rule."""
    return grade(answer, task["answer"], task.get("answer_type", "number"), task.get("unit", ""), task.get("scale", 1.0),
                 sign_insensitive=task.get("sign_insensitive", False))


# -----------------------------------------------------------------------------
# The behavior rubric, read off an episode's tool-call log


_OPERAND = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|\.\d+")


def _near(x, res, known):
    """|x| within res (the rounding its digits hide) plus 0.1% of a known value's magnitude."""
    return any(abs(abs(x) - abs(k)) <= res + 1e-3 * abs(k) + 1e-9 for k in known)


def read_values(log):
    """The numbers an agent has read from the database: the numeric cells its successful queries (and sample rows)
    returned, and the result of each calculation over them. A calculation counts when every number in its expression
    is one read before (to the digits written) or a whole-number constant: up to 100 (the 100 of a percent, the 1 and
    the year count of a growth rate) or a power of ten (a change of units), and at least one is read."""
    known = []
    for c in log:
        if not (c.ok and c.values):
            continue
        if c.name == "calculator":
            ops = _OPERAND.findall(str(c.arguments.get("expression", "")))
            vals = [float(t.replace(",", "")) for t in ops]
            read = [_near(v, resolution(t), known) for v, t in zip(vals, ops)]
            const = [v == int(v) and (v <= 100 or math.log10(v).is_integer()) for v in vals]
            if not any(read) or not all(r or k for r, k in zip(read, const)):
                continue
        known += c.values
    return known


def answer_grounded(answer_text, log):
    """Whether the final answer's number is one the agent read (read_values), to the digits it wrote, allowing the
    conversions a correct answer may make: a fraction as a percent (x 100) or back, and a scale word ('1.2 billion'
    of a table in millions). None when the answer has no number."""
    a = parse_number(final_answer(answer_text))
    if a is None:
        return None
    v, res, known = a.value, a.resolution, read_values(log)
    cands = [(v, res), (v / 100, res / 100), (v * 100, res * 100)]
    if a.scale != 1.0:
        cands += [(v * a.scale / u, res * a.scale / u) for u in (1.0, 1e3, 1e6, 1e9)]
    return any(_near(x, r, known) for x, r in cands)


def rubric(log, answer_text, turns, max_turns, format_errors=0, gold_tables=None):
    """What the agent did, as booleans and counts (eval.py averages them into rates). With the task's gold_tables
    (the tables that hold the answer) also whether it found them: most failures of a small model start with the
    wrong table."""
    queries = [c for c in log if c.name == "sql_query"]
    first_q = next((i for i, c in enumerate(log) if c.name == "sql_query"), None)
    listed = any(c.name == "get_table_names" and c.ok for c in log[: first_q if first_q is not None else len(log)])
    schema_first = bool(queries)
    for i, c in enumerate(log):
        if c.name == "sql_query":
            inspected = {t for d in log[:i] if d.name == "get_table_info" and d.ok for t in d.tables}
            if any(t not in inspected for t in c.tables):
                schema_first = False
    errors = [i for i, c in enumerate(queries) if not c.ok]
    # a call identical to an earlier one (name and arguments) learns nothing new: the database is read-only and the
    # calculator deterministic. It is the signature of the loops that run a small model into the turn limit.
    keys = [call_key(c.name, c.arguments) for c in log]
    out = {
        "listed_tables_first": listed,
        "schema_before_query": schema_first,
        "guessed_table_or_column": any(c.error in ("unknown_table", "unknown_column") for c in log),
        "sql_errors": len(errors),
        "recovered_from_error": bool(errors) and any(c.ok for c in queries[errors[0] + 1:]),
        "empty_result": any(c.empty for c in queries),
        "answered": final_answer(answer_text) is not None,
        "hallucinated": final_answer(answer_text) is not None and not any(c.ok for c in queries),
        "format_errors": format_errors + sum(c.error in ("unknown_tool", "bad_arguments") for c in log),
        "tool_calls": len(log),
        "repeated_call": len(set(keys)) < len(keys),
        "turns": turns,
        "hit_turn_limit": turns >= max_turns and final_answer(answer_text) is None,
    }
    empties = [i for i, c in enumerate(queries) if c.empty]
    # The fix an empty result's note points to, taken by the very next query: used_near_label, a label it named in
    # the tables read (a near one, or one of the row labels it listed when nothing was near); went_to_named_table, a
    # table it named as holding the label, asked for that label. Each entry is about the first note of its kind and
    # exists only where there was one. On 80 test tasks the default warm start took the first in 3 of 25 episodes and
    # the second in 11 of 35; 20 GRPO steps later, 0 of 23 and 22 of 39: its detours only show a table switch.
    for key, here in (("used_near_label", True), ("went_to_named_table", False)):
        j = next((i for i in empties if any((t is None) == here for t, _ in queries[i].offered)), None)
        if j is not None:
            nxt = queries[j + 1:j + 2]
            asked = {x.lower() for c in nxt for x in sql_strings(str(c.arguments.get("query", "")))}
            out[key] = any(v.lower() in asked and (here or t in nxt[0].tables)
                           for t, v in queries[j].offered if (t is None) == here)
    rows_after = lambda i: any(c.ok and not c.empty for c in queries[i + 1:])  # a later query found rows
    if empties:  # the recovery an empty result calls for
        out["recovered_from_empty"] = rows_after(empties[0])
        # the call after the first empty result is the calculator, or there is none: the agent stopped looking with a
        # value missing (answered_after_empty also counts the agents that looked on and found nothing). Across GRPO
        # checkpoints it moved against test accuracy (bench/RESULTS.md)
        first = next(i for i, c in enumerate(log) if c.name == "sql_query" and c.empty)
        out["gave_up_after_empty"] = first + 1 == len(log) or log[first + 1].name == "calculator"
    # an answer while the last empty result was never followed by a query that found rows: a number from nowhere.
    # `hallucinated` misses it, because a query that returns no rows is a successful query.
    out["answered_after_empty"] = out["answered"] and bool(empties) and not rows_after(empties[-1])
    # the seed's large model failed this way ("invented an answer"): a final number that is neither a value the
    # database returned nor a calculation over such values. It covers every route there: no query, an empty result, a
    # number typed into the calculator, a value misread or made up after a good query; and a final answer with no
    # number at all (every task's answer is one), so that saying "unknown" is not a way around it.
    out["ungrounded_answer"] = out["answered"] and answer_grounded(answer_text, log) is not True
    if gold_tables:
        opened = [t for c in log if c.name == "get_table_info" and c.ok for t in c.tables]
        out["first_table_right"] = bool(opened) and opened[0] in gold_tables
        out["read_gold_tables"] = set(gold_tables) <= {t for c in queries if c.ok for t in c.tables}
        out["recovered_from_wrong_table"] = bool(opened) and not out["first_table_right"] and out["read_gold_tables"]
    return out


def rubric_rates(rubrics):
    """A list of rubric() dicts -> the mean of each entry (booleans become rates), over the dicts that have it (the
    gold-table entries exist only for tasks that name their tables)."""
    keys = list(dict.fromkeys(k for r in rubrics for k in r))
    return {k: sum(float(r[k]) for r in rubrics if k in r) / sum(k in r for r in rubrics) for k in keys}


def load_tasks(path):
    """tasks.jsonl -> list of dicts, each with db resolved against the file's folder; errors name file and line."""
    import os
    base = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"task file {path} does not exist")
    tasks = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                t = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in ("id", "question", "answer", "db", "kind") if k not in t]
            if missing:
                raise ValueError(f"{path}:{n}: task lacks key(s) {missing}")
            t["db_path"] = os.path.join(base, t["db"])
            if not os.path.exists(t["db_path"]):
                raise FileNotFoundError(f"{path}:{n}: task {t['id']} names db {t['db']!r}, which does not exist")
            tasks.append(t)
    return tasks


def load_task_files(paths):
    """Several tasks.jsonl as one list, each task's db resolved against its own file's folder (train_grpo.py --tasks
    a.jsonl b.jsonl mixes datasets). An id in two files is an error: per-task statistics and reports key on it."""
    tasks, seen = [], {}
    for path in paths:
        for t in load_tasks(path):
            if t["id"] in seen:
                raise ValueError(f"task id {t['id']!r} is in both {seen[t['id']]} and {path}: ids must be unique across "
                                 f"the --tasks files")
            seen[t["id"]] = path
            tasks.append(t)
    return tasks
