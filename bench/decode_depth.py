"""
Decode steps at a rollout's depth: 16 engine rows holding 1,000-2,400 tokens each (shuffled over the rows, as
episodes drift apart), one token for a subset of live rows (rows between them finished their turn), timed with the
cache read in segments (Engine.decode_segments at model.SEGMENT_COST, the default) against one range over all
rows from the first live one to the last, read to the deepest (SEGMENT_COST huge: what the engine did before
segments for close gaps; wide gaps took a gather, which reads, writes and rereads each live row). Both run in the
same process, alternating, on the same cache; the median step is reported.

    python bench/decode_depth.py [--dtype float32] [--min-len 1000 --max-len 2400] [--json]
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
    ap.add_argument("--rounds", type=int, default=6, help="alternations of the two ways; each times 3 steps")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or default_dtype())
    m = from_pretrained(args.model, dtype=dtype)
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
        for i in range(args.rounds):  # ABBA: neither way always runs first
            for way in ((one, 10**12), (split, default))[:: 1 if i % 2 == 0 else -1]:
                way[0].extend(steps(live, way[1]))
        model.SEGMENT_COST = default
        segs = eng.decode_segments(live, torch.zeros(len(live), 1, 1, eng.cap + 1))
        rows.append(dict(live=name, rows=len(live), segments=len(segs),
                         slots_read=sum((s[0].stop - s[0].start) * s[1] for s in segs),
                         one_range_ms=statistics.median(one) * 1e3, segments_ms=statistics.median(split) * 1e3))
        rows[-1]["speedup"] = rows[-1]["one_range_ms"] / rows[-1]["segments_ms"]
    cond = dict(model=args.model, dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(),
                lens=f"{args.min_len}-{args.max_len}", segment_cost=default, torch=torch.__version__,
                cpu=platform.processor() or platform.machine())
    if args.json:
        print(json.dumps(dict(conditions=cond, results=rows), indent=1))
        return
    print(" ".join(f"{k}={v}" for k, v in cond.items()))
    print(f"{'live rows':>10} {'segments':>8} {'row-slots':>9} {'one range ms':>12} {'segments ms':>11} {'speedup':>7}")
    for r in rows:
        print(f"{r['live']:>10} {r['segments']:>8} {r['slots_read']:>9} {r['one_range_ms']:>12.1f} "
              f"{r['segments_ms']:>11.1f} {r['speedup']:>7.2f}")


if __name__ == "__main__":
    main()
