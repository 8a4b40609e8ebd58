"""
Decode steps at a rollout's depth: 16 engine rows holding 1,000-2,400 tokens each (shuffled over the rows, as
episodes drift apart), one token for a subset of live rows (rows between them finished their turn), timed with the
cache read in segments (Engine.decode_segments at model.SEGMENT_COST, the default) against one range over all
rows from the first live one to the last, read to the deepest (SEGMENT_COST huge: what the engine did before
segments for close gaps; wide gaps took a gather, which reads, writes and rereads each live row). Both run in the
same process, alternating, on the same cache; the median step is reported.

    python bench/decode_depth.py [--dtype float32] [--min-len 1000 --max-len 2400] [--json]
    python bench/decode_depth.py --replay 4   # whole rollouts, replayed from the oracle's episodes
    python bench/decode_depth.py --rollouts runs/grpo/step_64   # sampled rollouts of a warm-started checkpoint

--replay N replays N train tasks x 4 oracle episodes (wrong-table detours and misread labels drawn at 0.5 and 0.25,
so a group's episodes differ) through the engine as run_episodes drives it: the shared prompt prefilled and forked,
then turn by turn every live row decodes its next assistant message one token per step (rows drop out as their
messages end: the gaps of a real rollout) and takes its tool response as a chunk. The tokens are forced rather than
sampled (a decode step costs the same whatever it samples), so this measures a rollout's engine time with realistic
depths and gaps without a trained model. Each way replays the same episodes, alternating.

--rollouts CKPT samples real rollouts from a checkpoint (4 train tasks x 4 episodes a round, train_grpo.py's
defaults: T 0.7, 128 new tokens a message, 8 turns, 4,096 tokens), both ways per round on the same tasks and seed
(the same episodes, ABBA), timing the engine's decode steps and chunk feeds apart. --rounds sets the rounds.
"""
import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
from model import Engine, default_dtype, from_pretrained  # noqa: E402

SUBSETS = {"all 16": list(range(16)), "12 of 16": [0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 14, 15],
           "8 even": list(range(0, 16, 2)), "8 first": list(range(8)), "4 spread": [0, 5, 10, 15], "1 row": [7]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: this machine's (default_dtype)")
    ap.add_argument("--min-len", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=2400)
    ap.add_argument("--rounds", type=int, default=6, help="alternations of the two ways: 3 steps each way a round; with --replay, rounds / 2 replays each way; with --rollouts, one rollout each way a round")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--replay", type=int, default=0, metavar="TASKS", help="replay TASKS x 4 oracle episodes instead")
    ap.add_argument("--rollouts", metavar="CKPT", help="sample rollouts of this checkpoint instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or default_dtype())
    if args.rollouts:
        return rollouts(dtype, args)
    m = from_pretrained(args.model, dtype=dtype)
    if args.replay:
        return replay(m, dtype, args)
    B = 16
    eng = Engine(m, B, args.max_len + 64)
    lens = [args.min_len + (args.max_len - args.min_len) * i // (B - 1) for i in range(B)]
    random.Random(0).shuffle(lens)
    g = torch.Generator().manual_seed(0)
    for r in range(B):  # random tokens: the step's cost does not depend on what is cached
        eng.feed([r], [torch.randint(0, m.config.vocab_size, (lens[r],), generator=g).tolist()])
    default = model.SEGMENT_COST

    def steps(live, cost, n=4):
        model.SEGMENT_COST = cost
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            eng.feed(live, [[17]] * len(live), keep=False)
            ts.append(time.perf_counter() - t0)
        for r in live:  # back to the same depth: every measurement reads the same cache
            eng.pos[r] -= n
        return ts[1:]  # the first step of a switch pays for the other way's allocations

    rows = []
    for name, live in SUBSETS.items():
        one, split = [], []
        for i in range(args.rounds):
            for times, cost in abba(i, [(one, 10**12), (split, default)]):
                times.extend(steps(live, cost))
        model.SEGMENT_COST = default
        segs = eng.decode_segments(live, torch.zeros(len(live), 1, 1, eng.cap + 1))
        rows.append(dict(live=name, rows=len(live), segments=len(segs),
                         slots_read=sum((s[0].stop - s[0].start) * s[1] for s in segs),
                         one_range_ms=statistics.median(one) * 1e3, segments_ms=statistics.median(split) * 1e3))
        rows[-1]["speedup"] = rows[-1]["one_range_ms"] / rows[-1]["segments_ms"]
    emit(args, dict(conditions(args, dtype), lens=f"{args.min_len}-{args.max_len}"), rows,
         [("live rows", "live", ""), ("segments", "segments", ""), ("row-slots", "slots_read", ""),
          ("one range ms", "one_range_ms", ".1f"), ("segments ms", "segments_ms", ".1f"), ("speedup", "speedup", ".2f")])


def abba(i, ways):
    """The ways in round i's order: reversed every other round, so that neither always runs first."""
    return ways if i % 2 == 0 else ways[::-1]


def conditions(args, dtype):
    return dict(model=args.model, dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(),
                segment_cost=model.SEGMENT_COST, torch=torch.__version__, cpu=platform.processor() or platform.machine())


def emit(args, cond, rows, columns):
    """JSON with --json, else the conditions on one line and a table of columns (title, key, format)."""
    if args.json:
        print(json.dumps(dict(conditions=cond, results=rows), indent=1))
        return
    print(" ".join(f"{k}={v}" for k, v in cond.items()))
    print(" ".join(f"{title:>12}" for title, _, _ in columns))
    for r in rows:
        print(" ".join(f"{r[key]:>12{fmt}}" for _, key, fmt in columns))


def replay(m, dtype, args):
    from data.synth import ensure_synth
    from env_sql import load_tasks
    from model import load_tokenizer
    from rollout import prefill_groups
    from train_grpo import oracle_episodes
    tok, G = load_tokenizer(args.model), 4
    train = [t for t in load_tasks(ensure_synth()) if t["split"] == "train"]
    tasks = random.Random(0).sample(train, args.replay)
    eps = oracle_episodes(tok, [t for t in tasks for _ in range(G)], {}, random.Random(1), detour_p=0.5, misread_p=0.25)
    # each episode as (prompt, [(assistant message tokens, tool response tokens), ...]), built as
    # rollout.episode_from_messages builds its stream (a detour's masked wrong turn is decoded too, as sampled)
    plans = []
    for ep in eps:
        turns, msgs = [], ep.messages
        for i, msg in enumerate(msgs):
            if msg["role"] == "assistant":
                results = []
                for nxt in msgs[i + 1:]:
                    if nxt["role"] != "tool":
                        break
                    results.append(nxt["content"])
                turns.append((tok.encode(msg["content"]) + [tok.im_end], tok.tool_results(results) if results else []))
        assert [t for p in turns for t in p[0] + p[1]] == ep.tokens[ep.prompt_len:], "replay differs from the episode"
        plans.append((ep.tokens[:ep.prompt_len], turns))
    N = len(eps)
    eng = Engine(m, N, max(len(e.tokens) for e in eps) + 1)
    default = model.SEGMENT_COST

    def run(cost):
        model.SEGMENT_COST = cost
        eng.reset()
        t0 = time.perf_counter()
        prefill_groups(eng, [plans[i * G][0] for i in range(args.replay)], G)
        steps, decode, turn = 0, 0.0, 0
        while True:
            live = [r for r in range(N) if turn < len(plans[r][1])]
            if not live:
                break
            msgs = {r: plans[r][1][turn][0] for r in live}
            t1 = time.perf_counter()
            for s in range(max(len(x) for x in msgs.values())):  # forced decoding: row r feeds its s-th token
                rows = [r for r in live if s < len(msgs[r])]
                eng.feed(rows, [[msgs[r][s]] for r in rows], keep=False)
                steps += 1
            decode += time.perf_counter() - t1
            rows = [r for r in live if plans[r][1][turn][1]]
            if rows:
                eng.feed(rows, [plans[r][1][turn][1] for r in rows])
            turn += 1
        return time.perf_counter() - t0, decode, steps

    ways = {"one range": 10**12, "segments": default}
    res = {w: [] for w in ways}
    run(default)  # warm-up
    for i in range(max(1, args.rounds // 2)):  # at least one replay each way
        for w in abba(i, list(ways)):
            res[w].append(run(ways[w]))
    model.SEGMENT_COST = default
    rows = [dict(way=w, total_s=statistics.median(x[0] for x in v), decode_s=statistics.median(x[1] for x in v),
                 decode_steps=v[0][2]) for w, v in res.items()]
    for r in rows:
        r["ms_per_step"] = 1e3 * r["decode_s"] / r["decode_steps"]
    cond = dict(conditions(args, dtype), episodes=f"{args.replay} tasks x {G}", tokens=sum(len(e.tokens) for e in eps),
                sampled=sum(sum(e.mask) for e in eps))
    emit(args, cond, rows, [("way", "way", ""), ("rollout s", "total_s", ".1f"), ("decode s", "decode_s", ".1f"),
                            ("steps", "decode_steps", ""), ("ms/step", "ms_per_step", ".1f")])


def rollouts(dtype, args):
    from data.synth import ensure_synth
    from env_sql import load_tasks
    from model import load_tokenizer
    from rollout import run_episodes
    m, tok = from_pretrained(args.rollouts, dtype=dtype), load_tokenizer(args.rollouts)
    train = [t for t in load_tasks(ensure_synth()) if t["split"] == "train"]
    eng, default = Engine(m, 16, 4097), model.SEGMENT_COST
    feed, acc = Engine._feed, {}

    def timed(self, rows, chunks, keep=True):  # a decode step feeds one token a row; anything longer is a chunk
        t0 = time.perf_counter()
        out = feed(self, rows, chunks, keep)
        kind = "decode" if max(map(len, chunks)) == 1 else "chunk"
        acc[kind] = acc.get(kind, 0.0) + time.perf_counter() - t0
        acc[kind + "_calls"] = acc.get(kind + "_calls", 0) + 1
        acc["live"] = acc.get("live", 0) + (len(rows) if kind == "decode" else 0)
        return out

    Engine._feed = timed
    rows = []
    for rnd in range(args.rounds):
        tasks = random.Random(rnd).sample(train, 4)
        for way, cost in abba(rnd, [("one range", 10**12), ("segments", default)]):
            model.SEGMENT_COST = cost
            acc.clear()
            t0 = time.perf_counter()
            eps = run_episodes(m, tok, tasks, group_size=4, max_turns=8, max_tokens=4096, max_new_tokens=128,
                               temperature=0.7, generator=torch.Generator().manual_seed(rnd), engine=eng)
            rows.append(dict(round=rnd, way=way, rollout_s=time.perf_counter() - t0, decode_s=acc["decode"],
                             steps=acc["decode_calls"], live_rows=acc["live"] / acc["decode_calls"],
                             chunk_s=acc.get("chunk", 0.0), tokens=sum(len(e.tokens) for e in eps),
                             sampled=sum(sum(e.mask) for e in eps)))
    Engine._feed, model.SEGMENT_COST = feed, default
    args.model = args.rollouts
    emit(args, dict(conditions(args, dtype), episodes="4 tasks x 4, T 0.7"), rows,
         [("round", "round", ""), ("way", "way", ""), ("rollout s", "rollout_s", ".1f"), ("decode s", "decode_s", ".1f"),
          ("steps", "steps", ""), ("live a step", "live_rows", ".1f"), ("chunks s", "chunk_s", ".1f"),
          ("tokens", "tokens", ""), ("sampled", "sampled", "")])


if __name__ == "__main__":
    main()
