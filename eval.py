"""
Evaluate a policy on SQL tasks: pass rates (per kind) and the behavior rubric behind them.

    python eval.py --ckpt runs/grpo/step_84 [--tasks FILE --split test --samples 4 --temperature 0.7 --limit 100
                   --json OUT --compare runs/grpo/step_64 smollm2-135m]
    python eval.py --policy oracle --tasks data/generated/synth/tasks.jsonl [--split test] [--json OUT]

A model is scored by pass@1 (the mean over --samples sampled episodes per task), pass@k (the unbiased estimator
1 - C(n-c, k) / C(n, k) for k = --samples) and greedy accuracy (one episode at temperature 0), each overall and per
kind (single_table, multi_table), plus the rubric as rates and the mean turns and tokens. --compare puts more
checkpoints (or the base model) beside it in the same table; an eval_report.json given there puts its columns in
without running them again (an evaluation on a 2-core CPU takes minutes), once it is checked to be over the same tasks
with the same settings; given as --ckpt too, the table of saved reports prints with nothing rerun. Each further
column's paired difference from the first comes with its standard error and the number of tasks that moved each way.

The oracle is a scripted policy that solves a task through the same tool API a model uses, from the task's gold
metadata: get_table_names -> get_table_info on each gold table -> sql_query for each gold cell -> calculator on
the task's expression -> FINAL ANSWER. It must score 100% on synthetic tasks and >= 97% on converted TAT-QA; less
is a bug in the data, the tools or the grader, and the report lists each failing task with the reason.
Its transcripts are also the expert demonstrations of the warm start (train_grpo.py --sft-steps).
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
from collections import defaultdict

from env_sql import ENV_VERSION, SQLEnv, final_answer, grade_task, load_tasks, rubric, rubric_rates, sql_literal


def cell_query(c):
    """SELECT one gold cell: by row_idx when the task gives it (labels can repeat), else by item (and section)."""
    where = f"row_idx = {int(c['row_idx'])}" if c.get("row_idx") is not None else f"item = {sql_literal(c['item'])}"
    if c.get("row_idx") is None and c.get("section"):
        where += f" AND section = {sql_literal(c['section'])}"
    return f'SELECT "{c["column"]}" FROM "{c["table"]}" WHERE {where}'


def detour_query(task, table):
    """The first gold cell asked of another table, by its label alone (a row_idx would find a row in any table)."""
    return cell_query({**task["gold_cells"][0], "table": table, "row_idx": None, "section": None})


def near_miss_labels(label):
    """Labels a model writes for `label` from memory, most likely first: without a parenthetical ('Total dividends
    paid' for 'Total dividends paid ($ millions)'), the ', net' moved to the front ('Net property, plant and
    equipment'), without or with 'Total' ('Employees', 'Total inventory'). Nearly half the plan labels of the
    warm-started SmolLM2 on 80 test tasks were like these, and its capped episodes repeat them (bench/RESULTS.md)."""
    out = []
    if re.fullmatch(r".*\S\s*\([^)]*\)", label):
        out.append(re.sub(r"\s*\([^)]*\)$", "", label))
    if label.endswith(", net"):
        out.append("Net " + lower_first(label[:-len(", net")]))
    out.append(upper_first(label[len("Total "):]) if label.startswith("Total ") else "Total " + lower_first(label))
    return out


def upper_first(s):
    return s[:1].upper() + s[1:]


def lower_first(s):
    return s if s[:2].isupper() else s[:1].lower() + s[1:]  # 'Q3' and 'EBITDA' stay as they are


def plan_text(task, quote=False):
    """The oracle's plan, said before its first call: a letter per gold cell and the answer as an expression in them,
    e.g. "Plan: a = Total current assets (y2023), b = Total current liabilities (y2023); answer = a / b". quote: each
    label as the SQL literal the query will hold ("a = 'Total current assets' (y2023)"), so that copying it into the
    query ends where the string ends, as copying a label from an empty result's note does ("Closest: 'Net income'.")."""
    item = sql_literal if quote else str
    names = [f"{chr(97 + i)} = {item(c['item'])} ({c['column']})" for i, c in enumerate(task["gold_cells"])]
    return f"Plan: {', '.join(names)}; answer = " + task["expr"].format(*[chr(97 + i) for i in range(len(names))])


def oracle_episode(task, env, detour=None, plan=False, misread=None, quote=False):
    """-> (messages after the opening ones, final answer text, failure reason or ''). One tool call per turn.
    detour (table, query): a demonstration of recovery. After listing the tables the oracle first opens `table`, a
    wrong one, and with query=True also asks it for the first gold cell and gets no rows or an error; then it goes
    on as usual. Those wrong turns are marked "train": False, so a warm start clones the recovery, not the mistake.
    plan: the oracle also says what it is doing: plan_text(task), and "<the table's description> -> <table>" before
    inspecting each gold table (the description is fixed per kind of table while the names vary by company, and it
    is a match in the listing); a lookup ("{0}") answers from its query, without the calculator. Wrong turns of a
    detour say nothing. plan "early" (or True) says the plan before listing the tables, where its row labels cannot
    have been read yet: a model that clones it writes labels from the question into its plan and then queries them
    (52 of 77 first queries of the copied-answer warm start, bench/RESULTS.md). plan "late" says it with the first
    query, after the gold tables' row labels were printed, so every label it names is a copy of one on screen.
    The final answer copies the value as the tool printed it (0.8219149358, not 0.82): the grader accepts it, and a
    small model that clones a rounding gets the rounding wrong (0.83) where it copies a string right.
    misread (a label): a demonstration of fixing a label. The oracle asks for the first gold cell by `misread`
    (near_miss_labels) in the right table, gets no rows and the note naming the label the table holds, and asks again
    with that one. The wrong query is context only ("train": False); everything else is the straight oracle's, cloned,
    its plan included (a late plan goes with the corrected query). The plan names the real label, not the miss.
    quote: the plan writes its labels as SQL literals (plan_text)."""
    msgs, failure = [], ""

    def act(name, args, train=True, say=""):
        out = env.call(name, args)
        msgs.append({"role": "assistant", "content": say, "tool_calls": [{"name": name, "arguments": args}]})
        if not train:
            msgs[-1]["train"] = False
        msgs.append({"role": "tool", "content": out})
        return out

    early = plan in (True, "early")
    act("get_table_names", {}, say=plan_text(task, quote) if early else "")
    if detour:
        act("get_table_info", {"table_name": detour[0]}, train=False)
        if detour[1]:
            act("sql_query", {"query": detour_query(task, detour[0])}, train=False)
    for t in task["gold_tables"]:
        desc = env.catalog.get((t, ""), ("", ""))[0] if plan else ""
        out = act("get_table_info", {"table_name": t}, say=f"{desc} -> {t}" if desc else "")
        if out.startswith("Error"):
            failure = failure or f"get_table_info({t}): {out}"
    values, shown = [], []  # the values, and as the query printed them
    for i, c in enumerate(task["gold_cells"]):
        say = plan_text(task, quote) if plan == "late" and i == 0 else ""
        if misread and i == 0:
            act("sql_query", {"query": cell_query({**c, "item": misread, "row_idx": None})}, train=False)
        out = act("sql_query", {"query": cell_query(c)}, say=say)
        lines = out.split("\n")
        try:
            shown.append(lines[1].split(" | ")[0])
            values.append(float(shown[-1]))
        except (IndexError, ValueError):
            failure = failure or f"cell {c['table']}.{c['column']} [{c.get('item')}] -> {out[:120]!r}"
            values.append(float("nan"))
    answer = "I could not read every value."
    if not failure and plan and task["expr"] == "{0}":
        answer = f"The value is {shown[0]}.\nFINAL ANSWER: {shown[0]}"
    elif not failure:
        out = act("calculator", {"expression": task["expr"].format(*[repr(v) for v in values])})
        if out.startswith("Error"):
            failure = f"calculator: {out}"
        else:
            answer = f"The result is {out}.\nFINAL ANSWER: {out}"
    msgs.append({"role": "assistant", "content": answer})
    return msgs, answer, failure


def summarize(results):
    """results: dicts with kind, reward, rubric -> accuracy overall and per kind, and rubric rates."""
    by = defaultdict(list)
    for r in results:
        by[r["kind"]].append(r)
    rep = {"n": len(results), "accuracy": sum(r["reward"] for r in results) / max(len(results), 1),
           "by_kind": {k: {"n": len(v), "accuracy": sum(r["reward"] for r in v) / len(v)} for k, v in sorted(by.items())}}
    rep["rubric"] = rubric_rates([r["rubric"] for r in results])
    return rep


def run_oracle(tasks, limit=None, plan=False):
    results = []
    t0 = time.time()
    for i, task in enumerate(tasks[:limit]):
        with SQLEnv(task["db_path"]) as env:
            msgs, answer, failure = oracle_episode(task, env, plan=plan)
            reward = grade_task(task, answer)
            turns = sum(m["role"] == "assistant" for m in msgs)
            results.append({"id": task["id"], "kind": task["kind"], "reward": reward, "answer": final_answer(answer),
                            "gold": task["answer"], "failure": failure or ("" if reward else f"graded wrong: {final_answer(answer)} vs gold {task['answer']}"),
                            "rubric": rubric(env.log, answer, turns, max_turns=64, gold_tables=task.get("gold_tables")),
                            "messages": msgs})
        if (i + 1) % 200 == 0:
            print(f"  {i + 1}/{len(tasks[:limit])} tasks, {(i + 1) / (time.time() - t0):.0f}/s", file=sys.stderr)
    return results


def print_report(rep, title):
    print(f"== {title}: {rep['n']} tasks, accuracy {rep['accuracy']:.1%}")
    for k, v in rep["by_kind"].items():
        print(f"   {k:14s} {v['n']:6d}  {v['accuracy']:.1%}")
    print("   rubric: " + ", ".join(f"{k} {v:.2f}" for k, v in rep["rubric"].items()))


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def std_err(x):
    """Standard error of a mean over tasks: sample std / sqrt(n) (0 for fewer than 2 tasks). Tasks differ far more
    than samples of one task do, so this is the noise that decides whether two checkpoints differ."""
    n = len(x)
    if n < 2:
        return 0.0
    m = sum(x) / n
    return math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1) / n)


def paired_diff(a, b):
    """(mean of b - a, its standard error) over per-task scores of the same tasks in the same order. Pairing removes
    the spread of task difficulty that both checkpoints share: smaller than the two SEs combined."""
    if len(a) != len(b):
        raise ValueError(f"paired_diff: {len(a)} vs {len(b)} tasks; the reports must be over the same tasks")
    d = [y - x for x, y in zip(a, b)]
    return sum(d) / len(d), std_err(d)


def moved(a, b):
    """'up / down': the number of tasks whose score is higher in b than in a, and lower (same tasks, same order)."""
    return f"{sum(y > x for x, y in zip(a, b))} / {sum(y < x for x, y in zip(a, b))}"


def settings(args):
    """What an episode's score depends on besides the checkpoint, the task and the seed: a saved report is comparable
    only under the same values."""
    return {"greedy_run": args.greedy, "max_turns": args.max_turns, "max_tokens": args.max_tokens,
            "max_new_tokens": args.max_new_tokens, "env_version": ENV_VERSION, "repeat_note": args.repeat_note}


def saved_reports(path, tasks, args):
    """The model reports of an eval_report.json, checked to be over these tasks (the same ids in the same order, so
    paired differences pair the same tasks) under these settings. Reports written before the settings were recorded
    are checked on what they have (samples, temperature); one without env_version predates it, so had version 1."""
    try:
        with open(path) as f:
            reps = json.load(f)["reports"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --compare {path}: not a readable eval_report.json with a 'reports' list ({e!r})")
    ids = [t["id"] for t in tasks]
    for rep in reps:
        if rep.get("task_ids") != ids:
            raise SystemExit(f"error: --compare {path}: {rep.get('ckpt')!r} was evaluated on other tasks "
                             f"({rep.get('n_tasks')} tasks, not these {len(ids)}); rerun with the same --tasks, --split, "
                             f"--kind, --limit and --seed, or give the checkpoint itself")
        have = {"samples": rep.get("samples"), "temperature": rep.get("temperature"), "env_version": 1,
                "repeat_note": False, **rep.get("settings", {})}
        want_all = {"samples": args.samples, "temperature": args.temperature, **settings(args)}
        if args.samples == 0:  # greedy only: the sampling temperature plays no part
            del have["temperature"], want_all["temperature"]
        for key, want in want_all.items():
            if key in have and have[key] != want:
                raise SystemExit(f"error: --compare {path}: {rep['ckpt']!r} was evaluated with {key} = {have[key]!r}, "
                                 f"this run has {want!r}; give the checkpoint itself to evaluate it under this run's")
    return reps


def eval_model(ckpt, tasks, args):
    """Sampled and greedy episodes of one checkpoint -> (report, episodes)."""
    import torch
    from model import Engine, default_dtype, from_pretrained, load_tokenizer
    from rollout import run_episodes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or default_dtype(device))
    model = from_pretrained(ckpt, dtype=dtype, device=device)
    tok = load_tokenizer(ckpt)
    gen = torch.Generator(device).manual_seed(args.seed)
    n, sampled, greedy = args.samples, [], []
    # one engine for every batch (on CUDA its decode step is compiled once, not per batch)
    engine = Engine(model, args.batch_tasks * max(n, 1), args.max_tokens + 1)
    t0 = time.time()
    for i in range(0, len(tasks), args.batch_tasks):
        chunk = tasks[i:i + args.batch_tasks]
        kw = dict(max_turns=args.max_turns, max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens, engine=engine,
                  repeat_note=args.repeat_note)
        if n > 0:
            sampled += run_episodes(model, tok, chunk, n, temperature=args.temperature, generator=gen, **kw)
        if args.greedy:
            greedy += run_episodes(model, tok, chunk, 1, temperature=0.0, **kw)
        done = i + len(chunk)
        rate = done / (time.time() - t0)
        print(f"  {ckpt}: {done}/{len(tasks)} tasks, {rate:.2f} tasks/s, ETA {(len(tasks) - done) / rate:.0f}s", file=sys.stderr, flush=True)
    rep = {"ckpt": ckpt, "n_tasks": len(tasks), "samples": n, "temperature": args.temperature,
           "settings": settings(args), "task_ids": [t["id"] for t in tasks],
           "per_task": {}}  # per-task scores: standard errors, paired diffs
    correct = [sum(e.reward for e in sampled[j * n:(j + 1) * n]) for j in range(len(tasks))] if n > 0 else []
    if greedy:
        rep["per_task"]["greedy"] = [e.reward for e in greedy]
    if n > 0:
        rep["per_task"]["pass@1"] = [c / n for c in correct]
    kinds = sorted({t["kind"] for t in tasks})
    for kind in [None] + kinds:
        idx = [j for j, t in enumerate(tasks) if kind is None or t["kind"] == kind]
        if not idx:
            continue
        out = {"n": len(idx)}
        for key, scores in rep["per_task"].items():  # greedy and/or pass@1: the mean of the per-task scores
            out[key] = sum(scores[j] for j in idx) / len(idx)
        if n > 0:
            out[f"pass@{n}"] = sum(pass_at_k(n, int(correct[j]), n) for j in idx) / len(idx)
        if kind is None:
            rep.update(out)
        else:
            rep.setdefault("by_kind", {})[kind] = out
    eps = sampled or greedy
    rep["rubric"] = rubric_rates([e.rubric for e in eps])
    rep["mean_turns"] = sum(e.turns for e in eps) / len(eps)
    rep["mean_tokens"] = sum(len(e.tokens) for e in eps) / len(eps)
    rep["mean_response_tokens"] = sum(sum(e.mask) for e in eps) / len(eps)
    return rep, sampled + greedy


def print_model_table(reps):
    cols = [r["ckpt"] for r in reps]
    w = max(28, *(len(c) + 2 for c in cols))
    print("metric".ljust(34) + "".join(c[-w + 2:].rjust(w) for c in cols))
    rows = [("greedy accuracy", lambda r: r.get("greedy"))]
    n = reps[0]["samples"]
    if n > 0:
        rows += [("pass@1", lambda r: r.get("pass@1")), (f"pass@{n}", lambda r: r.get(f"pass@{n}"))]
    table = [(name, [f(r) for r in reps], "") for name, f in rows]
    # the noise: each score's standard error over tasks, and each further column's paired difference from the first
    # (the same tasks) with its standard error. Reports without per-task scores (older JSON) skip these rows.
    for key in ("greedy", "pass@1"):
        if not all(key in r.get("per_task", {}) for r in reps):
            continue
        table.append((f"{key}: standard error", [std_err(r["per_task"][key]) for r in reps], ""))
        if len(reps) > 1:
            diffs = [paired_diff(reps[0]["per_task"][key], r["per_task"][key]) for r in reps[1:]]
            table.append((f"{key}: minus the first column", [None] + [mean for mean, _ in diffs], "+"))
            table.append((f"{key}:   its paired std. error", [None] + [se for _, se in diffs], ""))
            # how many tasks moved each way: a +0.0 can be 4 gained and 4 lost, or nothing moving at all
            table.append((f"{key}:   tasks up / down", [None] + [moved(reps[0]["per_task"][key], r["per_task"][key])
                                                                  for r in reps[1:]], ""))
    rows = []
    for kind in sorted(reps[0].get("by_kind", {})):
        for key in ("greedy", "pass@1") if n > 0 else ("greedy",):
            rows.append((f"  {kind} {key}", lambda r, kind=kind, key=key: r["by_kind"].get(kind, {}).get(key)))
    for k in dict.fromkeys(k for r in reps for k in r["rubric"]):  # an entry one report lacks shows as '-'
        rows.append((f"rubric: {k}", lambda r, k=k: r["rubric"].get(k)))
    rows += [("mean turns", lambda r: r["mean_turns"]), ("mean tokens", lambda r: r["mean_tokens"])]
    table += [(name, [f(r) for r in reps], "") for name, f in rows]
    for name, vals, sign in table:
        print(name.ljust(34) + "".join(("-" if v is None else v if isinstance(v, str) else f"{v:{sign}.3f}"
                                        if abs(v) < 10 else f"{v:.1f}").rjust(w) for v in vals))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", choices=["model", "oracle"], default="model")
    ap.add_argument("--plan", nargs="?", const="early", choices=["early", "late"],
                    help="the oracle says its plan, before listing the tables (early, the default) or with its first "
                         "query (late) (train_grpo.py --sft-plan)")
    ap.add_argument("--ckpt", default="smollm2-135m",
                    help="checkpoint directory or 'smollm2-135m'; an eval_report.json puts its saved columns first "
                         "(with --compare of saved reports only, the table of earlier evaluations, nothing rerun)")
    ap.add_argument("--compare", nargs="*", default=[],
                    help="more checkpoints (or the base model) to put beside --ckpt; an eval_report.json adds its "
                         "columns without rerunning them (same tasks and settings, checked)")
    ap.add_argument("--samples", type=int, default=4, help="sampled episodes per task for pass@1 / pass@k (0 = greedy only)")
    ap.add_argument("--temperature", type=float, default=0.7,
                    help="sampling temperature of pass@k: train_grpo.py's rollout temperature, the policy GRPO trained")
    ap.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True,
                    help="also one greedy episode per task (--no-greedy: sampled pass@k only, ~1/(samples+1) less time)")
    ap.add_argument("--max-turns", type=int, default=8)
    ap.add_argument("--repeat-note", action=argparse.BooleanOptionalAction, default=False,
                    help="a tool call identical to an earlier one says so after its result (train_grpo.py "
                         "--repeat-note). Measured (bench/RESULTS.md): at test time it took 4 x 4 seed 1 from 31.4%% "
                         "to 29.0%% greedy on 255 test tasks (the model ignores it); trained with it, the same seed "
                         "scored 18.0%%")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--max-new-tokens", type=int, default=128, help="cap of one assistant message (train_grpo.py's default)")
    ap.add_argument("--batch-tasks", type=int, default=8, help="tasks per engine batch (x --samples rows)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="default: bfloat16 where bf16 is fast (model.bf16_fast: CUDA, a CPU with AMX / AVX-512), "
                         "else float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for eval_report.json and eval_transcripts.jsonl (default: beside "
                    "--json; never the trainer's transcripts.jsonl, so an evaluation can write into its run's folder)")
    ap.add_argument("--tasks", default="data/generated/synth/tasks.jsonl", help="tasks.jsonl (built if it is the default and absent)")
    ap.add_argument("--split", default=None, help="only tasks of this split (train/val/test); default: test for a model, all for the oracle")
    ap.add_argument("--kind", default="all", choices=["single_table", "multi_table", "all"],
                    help="only tasks of this kind (before --limit's sample): the seed's headline is the multi-table "
                         "benchmark of a model trained on single-table questions")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the JSON report here")
    ap.add_argument("--transcripts", default=None, help="write one JSON line per episode here")
    args = ap.parse_args(argv)
    # the output folders exist before the evaluation starts, not after it has run for minutes
    for folder in [args.out] + [os.path.dirname(os.path.abspath(p)) for p in (args.json, args.transcripts) if p]:
        if folder:
            os.makedirs(folder, exist_ok=True)
    if args.policy == "model" and not args.greedy and args.samples < 1:
        sys.exit("error: --no-greedy needs --samples >= 1 (there would be nothing to evaluate)")
    if args.split is None and args.policy == "model":
        args.split = "test"
    if args.tasks == ap.get_default("tasks") and not os.path.exists(args.tasks):
        from data.synth import ensure_synth
        ensure_synth(os.path.dirname(args.tasks))
    all_tasks = load_tasks(args.tasks)
    tasks = [t for t in all_tasks if args.split is None or t.get("split") == args.split]
    if not tasks:  # e.g. a converted TAT-QA or FinQA dev file holds split 'val' only
        have = sorted({str(t.get("split")) for t in all_tasks})
        sys.exit(f"error: no tasks in {args.tasks}" + (f" with split {args.split!r} (it has: {', '.join(have)}; "
                                                        f"pass --split)" if args.split and all_tasks else ""))
    if args.kind != "all":
        have = sorted({str(t.get("kind")) for t in tasks})
        tasks = [t for t in tasks if t.get("kind") == args.kind]
        if not tasks:
            sys.exit(f"error: no {args.kind} tasks in {args.tasks}" + (f" [{args.split}]" if args.split else "")
                     + f" (it has: {', '.join(have)}; pass --kind)")
    if args.policy == "model":
        if args.limit and args.limit < len(tasks):  # a seeded sample across companies, not the first few
            tasks = random.Random(args.seed).sample(tasks, args.limit)
        return main_model(args, tasks)
    scripted = [t for t in tasks if "expr" in t]  # converted data may lack a derivation the oracle can follow
    if len(scripted) < len(tasks):
        print(f"the oracle skips {len(tasks) - len(scripted)} of {len(tasks)} tasks: they have no gold_cells/expr")
    if not scripted:
        sys.exit(f"error: no task in {args.tasks} has an expr for the oracle to follow")
    results = run_oracle(scripted, args.limit, args.plan)
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


def main_model(args, tasks):
    reps, all_eps = [], []
    # saved reports are read (and checked) first: a mismatch fails now, not after the checkpoints have run
    saved = {p: saved_reports(p, tasks, args) for p in [args.ckpt] + args.compare if p.endswith(".json")}
    for ckpt in [args.ckpt] + args.compare:
        if ckpt in saved:
            reps += saved[ckpt]  # their episodes are in that report's eval_transcripts.jsonl
        else:
            rep, eps = eval_model(ckpt, tasks, args)
            reps.append(rep)
            all_eps.append((ckpt, eps))
            print(f"  {ckpt}: " + ", ".join(f"{k} {rep[k]:.3f}" for k in ("pass@1", "greedy") if k in rep),
                  file=sys.stderr, flush=True)
        # the files hold the reports so far: a comparison stopped during the next checkpoint keeps this one's
        report = write_report(reps, all_eps, args)
    kind = "" if args.kind == "all" else f" {args.kind}"
    print(f"== {len(tasks)} {args.split}{kind} tasks from {args.tasks}; {args.samples} samples at temperature "
          f"{args.temperature}" + (" + 1 greedy" if args.greedy else "") + " per task")
    print_model_table(reps)
    return report


def write_report(reps, all_eps, args):
    """eval_report.json (the reports so far, in --ckpt, --compare order) and eval_transcripts.jsonl, each written to a
    temporary name and renamed: a kill leaves the previous whole file, never half of one. -> the report."""
    out = args.out or (os.path.dirname(os.path.abspath(args.json)) if args.json else None)
    report = {"pass@1": reps[0].get("pass@1"), "reports": reps}
    if args.json or out:
        path = args.json or os.path.join(out, "eval_report.json")
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)
    if args.transcripts or out:
        path = args.transcripts or os.path.join(out, "eval_transcripts.jsonl")
        with open(path + ".tmp", "w") as f:
            for ckpt, eps in all_eps:
                for e in eps:
                    f.write(json.dumps({"ckpt": ckpt, "task": e.task["id"], "reward": e.reward, "finish": e.finish,
                                        "rubric": e.rubric, "calls": e.calls, "transcript": e.transcript()}) + "\n")
        os.replace(path + ".tmp", path)
    return report


if __name__ == "__main__":
    main()
