"""
Evaluate a policy on SQL tasks: accuracy (per kind) and the behavior rubric.

    python eval.py --policy oracle --tasks data/generated/synth/tasks.jsonl [--split test] [--json OUT]

The oracle is a scripted policy that solves a task through the same tool API a model uses, from the task's gold
metadata: get_table_names -> get_table_info on each gold table -> sql_query for each gold cell -> calculator on
the task's expression -> FINAL ANSWER. It must score 100% on synthetic tasks and >= 97% on converted TAT-QA; less
is a bug in the data, the tools or the grader, and the report lists each failing task with the reason.
Its transcripts are also the expert demonstrations of the warm start (train_grpo.py --sft-steps).
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict

from env_sql import SQLEnv, final_answer, grade, load_tasks, rubric, task_messages


def sql_literal(v):
    return "'" + str(v).replace("'", "''") + "'"


def cell_query(c):
    """SELECT one gold cell: by row_idx when the task gives it (labels can repeat), else by item (and section)."""
    where = f"row_idx = {int(c['row_idx'])}" if c.get("row_idx") is not None else f"item = {sql_literal(c['item'])}"
    if c.get("row_idx") is None and c.get("section"):
        where += f" AND section = {sql_literal(c['section'])}"
    return f'SELECT "{c["column"]}" FROM "{c["table"]}" WHERE {where}'


def oracle_episode(task, env):
    """-> (messages after the opening ones, final answer text, failure reason or ''). One tool call per turn."""
    msgs, failure = [], ""

    def act(name, args):
        out = env.call(name, args)
        msgs.append({"role": "assistant", "content": "", "tool_calls": [{"name": name, "arguments": args}]})
        msgs.append({"role": "tool", "content": out})
        return out

    act("get_table_names", {})
    for t in task["gold_tables"]:
        out = act("get_table_info", {"table_name": t})
        if out.startswith("Error"):
            failure = failure or f"get_table_info({t}): {out}"
    values = []
    for c in task["gold_cells"]:
        out = act("sql_query", {"query": cell_query(c)})
        lines = out.split("\n")
        try:
            values.append(float(lines[1].split(" | ")[0]))
        except (IndexError, ValueError):
            failure = failure or f"cell {c['table']}.{c['column']} [{c.get('item')}] -> {out[:120]!r}"
            values.append(float("nan"))
    answer = "I could not read every value."
    if not failure:
        out = act("calculator", {"expression": task["expr"].format(*[repr(v) for v in values])})
        if out.startswith("Error"):
            failure = f"calculator: {out}"
        else:
            answer = f"The result is {out}.\nFINAL ANSWER: {round(float(out), 2)}"
    msgs.append({"role": "assistant", "content": answer})
    return msgs, answer, failure


def grade_task(task, answer):
    return grade(answer, task["answer"], task.get("answer_type", "number"), task.get("unit", ""), task.get("scale", 1.0),
                 sign_insensitive=task.get("sign_insensitive", False))


def summarize(results):
    """results: dicts with kind, reward, rubric -> accuracy overall and per kind, and rubric rates."""
    by = defaultdict(list)
    for r in results:
        by[r["kind"]].append(r)
    rep = {"n": len(results), "accuracy": sum(r["reward"] for r in results) / max(len(results), 1),
           "by_kind": {k: {"n": len(v), "accuracy": sum(r["reward"] for r in v) / len(v)} for k, v in sorted(by.items())}}
    keys = results[0]["rubric"].keys() if results else []
    rep["rubric"] = {k: sum(float(r["rubric"][k]) for r in results) / len(results) for k in keys}
    return rep


def run_oracle(tasks, limit=None):
    results = []
    t0 = time.time()
    for i, task in enumerate(tasks[:limit]):
        with SQLEnv(task["db_path"]) as env:
            msgs, answer, failure = oracle_episode(task, env)
            reward = grade_task(task, answer)
            turns = sum(m["role"] == "assistant" for m in msgs)
            results.append({"id": task["id"], "kind": task["kind"], "reward": reward, "answer": final_answer(answer),
                            "gold": task["answer"], "failure": failure or ("" if reward else f"graded wrong: {final_answer(answer)} vs gold {task['answer']}"),
                            "rubric": rubric(env.log, answer, turns, max_turns=64), "messages": msgs})
        if (i + 1) % 200 == 0:
            print(f"  {i + 1}/{len(tasks[:limit])} tasks, {(i + 1) / (time.time() - t0):.0f}/s", file=sys.stderr)
    return results


def print_report(rep, title):
    print(f"== {title}: {rep['n']} tasks, accuracy {rep['accuracy']:.1%}")
    for k, v in rep["by_kind"].items():
        print(f"   {k:14s} {v['n']:6d}  {v['accuracy']:.1%}")
    print("   rubric: " + ", ".join(f"{k} {v:.2f}" for k, v in rep["rubric"].items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", choices=["oracle"], default="oracle")
    ap.add_argument("--tasks", default="data/generated/synth/tasks.jsonl", help="tasks.jsonl (built if it is the default and absent)")
    ap.add_argument("--split", default=None, help="only tasks of this split (train/val/test); default all")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the JSON report here")
    ap.add_argument("--transcripts", default=None, help="write one JSON line per episode here")
    args = ap.parse_args()
    if args.tasks == ap.get_default("tasks") and not os.path.exists(args.tasks):
        from data.synth import ensure_synth
        ensure_synth(os.path.dirname(args.tasks))
    tasks = [t for t in load_tasks(args.tasks) if args.split is None or t.get("split") == args.split]
    if not tasks:
        sys.exit(f"error: no tasks in {args.tasks}" + (f" with split {args.split!r}" if args.split else ""))
    results = run_oracle(tasks, args.limit)
    rep = summarize(results)
    fails = [r for r in results if not r["reward"]]
    rep["failures"] = [{"id": r["id"], "kind": r["kind"], "reason": r["failure"]} for r in fails]
    print_report(rep, f"oracle on {args.tasks}" + (f" [{args.split}]" if args.split else ""))
    for f in rep["failures"][:20]:
        print(f"   FAIL {f['id']}: {f['reason']}")
    if len(fails) > 20:
        print(f"   ... {len(fails) - 20} more failures in the JSON report")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    if args.transcripts:
        with open(args.transcripts, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
