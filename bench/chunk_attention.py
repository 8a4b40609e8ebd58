"""
Chunk feeds on CPU (a prefill of chat prompts, tool responses appended to deep rows) through the two attentions
Engine._feed can run: the written-out one (model.cached_attention: two batched matmuls, an fp32 softmax) and SDPA's
flash kernel with a boolean mask. The engine picks the first while a feed's fp32 scores (rows x heads x chunk x
keys x 4 bytes) take at most model.CHUNK_SCORES_MAX bytes; this times every case both ways, alternating, in one
process, on the same rows and chunks, and checks that both give the same logits.

    python bench/chunk_attention.py [--dtype float32] [--rounds 5] [--json]
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from bench.generate import prompts_for  # noqa: E402

# (name, rows, tokens already in each row, chunk lengths (lo, hi)): the benchmark's prompts, and a rollout turn's
# tool responses appended after the ~580-token system prompt and a few turns
CASES = [("prefill, 16 chat prompts", 16, 0, None), ("16 rows at ~600, 20-120 tokens", 16, 600, (20, 120)),
         ("16 rows at ~1,200, 20-120 tokens", 16, 1200, (20, 120)), ("16 rows at ~1,200, 100-400 tokens", 16, 1200, (100, 400)),
         ("1 row at ~600, 20-400 tokens", 1, 600, (20, 400))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: model.default_dtype()")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=5, help="timed feeds per case and side (alternating); best reported")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or M.default_dtype("cpu"))
    path = M.resolve_model_path(args.model)
    model = M.from_pretrained(path, dtype=dtype)
    tok = M.load_tokenizer(path)
    vocab, limit = model.config.vocab_size, M.CHUNK_SCORES_MAX
    results = []
    for name, rows, depth, span in CASES:
        g = torch.Generator().manual_seed(0)
        if span is None:
            history, chunks = [[] for _ in range(rows)], prompts_for(tok, rows, vocab)
        else:  # ids do not change speed
            history = [torch.randint(0, vocab, (depth + int(torch.randint(-50, 50, (1,), generator=g)),), generator=g).tolist()
                       for _ in range(rows)]
            chunks = [torch.randint(0, vocab, (int(torch.randint(*span, (1,), generator=g)),), generator=g).tolist()
                      for _ in range(rows)]
        eng = M.Engine(model, rows, max(map(len, history)) + max(map(len, chunks)) + 2)
        rid = list(range(rows))
        times, logits = {"written": [], "flash": []}, {}
        for k in range(args.rounds + 1):  # the first round warms up
            for side in ("written", "flash"):
                M.CHUNK_SCORES_MAX = limit if side == "written" else 0
                eng.reset()
                if depth:
                    eng.feed(rid, history)
                t = time.perf_counter()
                logits[side] = eng.feed(rid, chunks).clone()
                if k:
                    times[side].append(time.perf_counter() - t)
        M.CHUNK_SCORES_MAX = limit
        w, f = min(times["written"]), min(times["flash"])
        results.append({"case": name, "rows": rows, "chunk_tokens": sum(map(len, chunks)),
                        "written_ms": round(w * 1e3, 1), "flash_ms": round(f * 1e3, 1), "speedup": round(f / w, 2),
                        "max_abs_logit_diff": round((logits["written"] - logits["flash"]).abs().max().item(), 4)})
        if not args.json:
            print(results[-1], file=sys.stderr, flush=True)
    conditions = {"model": args.model, "dtype": str(dtype).split(".")[1], "threads": args.threads,
                  "chunk_scores_max": limit, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
                  "torch": torch.__version__, "note": "whole feeds (all layers, lm_head); the engine splits ragged chunks "
                  "into groups of similar length, each one call"}
    if args.json:
        print(json.dumps({"conditions": conditions, "results": results}, indent=2))
        return
    print("conditions: " + ", ".join(f"{k}={v}" for k, v in conditions.items()))
    print(f"{'case':<36} {'tokens':>7} {'written ms':>11} {'flash ms':>9} {'speedup':>8} {'logit diff':>11}")
    for r in results:
        print(f"{r['case']:<36} {r['chunk_tokens']:>7} {r['written_ms']:>11} {r['flash_ms']:>9} {r['speedup']:>8} "
              f"{r['max_abs_logit_diff']:>11}")


if __name__ == "__main__":
    main()
