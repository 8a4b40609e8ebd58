"""
Tool-response appends (Engine.feed, eager) on CUDA under each set of SDPA backends, a diagnostic for a lent GPU. A
rollout turn appends every row's tool response (new lengths every turn) to rows that are already deep; the attention
call is SDPA with a boolean (b, 1, T, L) mask and grouped kv heads. cuDNN's backend builds a graph per new shape, the
cost the GRPO update showed (bench/RESULTS.md), so this times new shapes ("new") and the same shapes again ("again").
Each backend set runs in its own process, so no set inherits another's per-shape setup, on the same rows and chunks.

    python bench/feed_backends.py --random-config qwen3-4b --rows 64 --depth 1000 --rounds 6 [--json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.generate import CONFIGS, random_model_dir  # noqa: E402
from model import Engine, from_pretrained  # noqa: E402

SETS = {"default": None, "no-cudnn": ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],
        "cudnn": ["CUDNN_ATTENTION"], "efficient": ["EFFICIENT_ATTENTION"], "math": ["MATH"]}


def one(args, name, out_path):
    """Time the feeds under backend set `name` in this process; write the result (and the first round's logits)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = from_pretrained(random_model_dir(CONFIGS[args.random_config], args.random_config, "cuda"),
                            dtype=torch.bfloat16, device="cuda")
    vocab = model.config.vocab_size
    eng = Engine(model, args.rows, args.max_tokens, compile=False)
    g = torch.Generator().manual_seed(0)  # the same rows and chunks in every process
    rows = list(range(args.rows))
    deep = [torch.randint(0, vocab, (int(args.depth * (0.75 + 0.5 * torch.rand(1, generator=g).item())),),
                          generator=g).tolist() for _ in rows]
    rounds = [[torch.randint(0, vocab, (int(torch.randint(20, 400, (1,), generator=g)),), generator=g).tolist()
               for _ in rows] for _ in range(args.rounds)]
    backends = SETS[name]
    ctx = (lambda: contextlib.nullcontext()) if backends is None else \
        (lambda: sdpa_kernel([getattr(SDPBackend, b) for b in backends]))
    res = {"set": name, "backends": backends or "SDPA's choice"}
    try:
        eng.feed(rows, deep)  # the rows' history under SDPA's own choice, the same in every process (not timed)
        start = list(eng.pos)
        # the capacity the rounds reach, from the start: both passes then see the same (b, 1, T, cap + 1) shapes
        eng._grow(max(start[r] + sum(len(ch[r]) for ch in rounds) for r in rows))
        for label in ("new", "again"):
            for r in rows:  # back to the rows' history: the cache beyond it is overwritten
                eng.pos[r] = start[r]
            torch.cuda.synchronize()
            t = time.perf_counter()
            with ctx():
                for k, chunks in enumerate(rounds):
                    logits = eng.feed(rows, chunks)
                    if label == "new" and k == 0:
                        first = logits.clone()  # saved after the timing: a copy to the host would sync inside it
            torch.cuda.synchronize()
            res[f"{label}_s_per_round"] = round((time.perf_counter() - t) / len(rounds), 4)
        torch.save(first.cpu(), out_path + ".pt")
    except RuntimeError as e:  # a backend that does not take this call (mask, grouped heads) or runs out of memory
        res["error"] = " ".join(str(e).split())[:160]
    res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    json.dump(res, open(out_path, "w"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-config", default="qwen3-4b", choices=list(CONFIGS))
    ap.add_argument("--rows", type=int, default=64, help="engine rows (the README's 4B command: 8 tasks x 8)")
    ap.add_argument("--depth", type=int, default=1000, help="tokens already in each row (0.75-1.25x)")
    ap.add_argument("--rounds", type=int, default=6, help="appends to all rows, 20-400 tokens each, timed")
    ap.add_argument("--max-tokens", type=int, default=4096, help="engine row length")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # the child process: one set
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench/feed_backends.py compares CUDA attention backends; no CUDA device here")
    if args.only:
        return one(args, args.only, args.result)
    random_model_dir(CONFIGS[args.random_config], args.random_config, "cuda")  # written once, before the children
    tmp = tempfile.mkdtemp()
    print(f"Engine.feed, {torch.cuda.get_device_name()}, torch {torch.__version__}, random {args.random_config} bf16, "
          f"{args.rows} rows ~{args.depth} deep, {args.rounds} rounds of 20-400-token appends per row", flush=True)
    print(f"  {'backends':10s} {'new s/round':>12s} {'again s/round':>14s} {'peak GiB':>9s}  logit diff / error", flush=True)
    results, first_pt = [], None
    for name in args.sets:  # a line per set as it finishes
        path = os.path.join(tmp, name + ".json")
        cmd = [sys.executable, __file__, "--only", name, "--result", path] + sys.argv[1:]
        p = subprocess.run(cmd, capture_output=True, text=True)
        r = json.load(open(path)) if os.path.exists(path) else {"set": name, "error": p.stderr.strip()[-300:]}
        if os.path.exists(path + ".pt"):  # the first round's logits against the first set that produced them
            if first_pt is None:
                first_pt = path + ".pt"
            else:
                r["max_abs_logit_diff"] = round((torch.load(path + ".pt") - torch.load(first_pt)).abs().max().item(), 4)
        results.append(r)
        print(f"  {name:10s} {r.get('new_s_per_round', float('nan')):12.3f} {r.get('again_s_per_round', float('nan')):14.3f} "
              f"{r.get('peak_gib', float('nan')):9.1f}  {r.get('max_abs_logit_diff', '')} {r.get('error', '')}", flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
