"""
Where a GRPO update's time goes (a diagnostic for a lent GPU): the same synthetic episodes (bench/grpo_step.py) go
through train_grpo.update() several times at lr 0, so the weights never change between the timings:
  cuDNN allowed, cold   SDPA may pick cuDNN (train_grpo._update, the peer), on shapes the process has not seen
                        (every real step's micro-batches have new lengths; cuDNN builds a graph per new shape);
  cuDNN allowed, again  the same episodes once more (what is left when per-shape setup is cached);
  update(), new         train_grpo.update as it runs: cuDNN's SDPA excluded, new episodes;
or, with --profile instead of those timings, update() on 4 new episodes (two micro-batches) under torch.profiler:
kernel time against wall time (the gap is the GPU waiting for the host), kernels launched, top kernels and host ops.
(Profiling a whole 16-micro-batch update did not finish in 4 minutes on an H100.) With --micro-batches N..., instead:
update() on new episodes at each micro-batch size, with its peak memory (the engine's KV cache, held during the
update in train_grpo.py, comes on top). With --ab-ckpt-keep N (and --grad-ckpt), instead: N rounds of new episodes,
each updated twice in alternating order, once as update() runs (the CPU attention's outputs kept by checkpointing,
model.CKPT_KEEP) and once recomputing everything; --json prints the rounds as JSON.

    python bench/update_profile.py --random-config qwen3-4b --episodes 32 --length 1600 [--profile] [train_grpo.py flags]
    python bench/update_profile.py --random-config qwen3-4b --episodes 16 --micro-batches 2 4 8 --grad-ckpt
    python bench/update_profile.py --model smollm2-135m --episodes 4 --length 1600 --grad-ckpt --ab-ckpt-keep 4
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.generate import profile_totals  # noqa: E402
from bench.decode_depth import abba  # noqa: E402
from bench.grpo_step import add_random_model, synthetic_episodes, take  # noqa: E402
from train_grpo import _update, build_model, get_args, peak_memory_gb, update  # noqa: E402


def main():
    argv = sys.argv[1:]
    prof_on = "--profile" in argv
    if prof_on:
        argv.remove("--profile")
    name = (take(argv, "--random-config") or ["qwen3-4b"])[0]
    n_eps = int((take(argv, "--episodes") or [32])[0])
    length = int((take(argv, "--length") or [1600])[0])
    sweep = [int(x) for x in take(argv, "--micro-batches", None) or []]
    ab_keep = int((take(argv, "--ab-ckpt-keep") or [0])[0])
    as_json = take(argv, "--json", 0) is not None
    if "--model" not in argv:  # a random model of the named shape (a real one: --model DIR)
        add_random_model(argv, name)
    args = get_args(argv + ["--wandb", "off"])
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, _ = build_model(args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    G = args.group_size
    vocab = model.config.vocab_size

    def eps_for(seed, n=n_eps, L=length):
        return synthetic_episodes(max(n // G, 1), min(G, n), 700, L, vocab, args.max_tokens, seed=seed)

    def timed(eps, fn=update):
        sync()
        t = time.perf_counter()
        fn(model, opt, eps, alternating(len(eps)), args, 0.0, None, True)
        sync()
        return time.perf_counter() - t

    timed(eps_for(99, n=2, L=800))  # allocator, optimizer state, kernels' first launches
    if prof_on:
        return profile_update(model, opt, eps_for(3, n=4), args, cuda, timed)
    if ab_keep:
        return ab_ckpt_keep(ab_keep, eps_for, timed, args, cuda, as_json)
    if sweep:
        print(f"update() of {n_eps} new episodes of ~{length} tokens, grad-ckpt {args.grad_ckpt}, LoRA r={args.lora_rank}, "
              f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")
        print(f"  {'micro-batch':>11s} {'s':>7s} {'tok/s':>9s} {'peak GiB':>9s}")
        for k, mb in enumerate(sweep):
            args.micro_batch = mb
            eps = eps_for(10 + k)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = timed(eps)
            print(f"  {mb:11d} {t:7.2f} {sum(len(e.tokens) for e in eps) / t:9.0f} {peak_memory_gb(args.device):9.1f}", flush=True)
        return
    first = eps_for(1)
    tokens = sum(len(e.tokens) for e in first)
    res = [("cuDNN allowed, cold", timed(first, _update)), ("cuDNN allowed, again", timed(first, _update)),
           ("update(), new episodes", timed(eps_for(2))), ("update(), again", timed(eps_for(2)))]
    print(f"update of {n_eps} synthetic episodes, {tokens} tokens, micro-batch {args.micro_batch}, grad-ckpt "
          f"{args.grad_ckpt}, LoRA r={args.lora_rank}, {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")
    for k, t in res:
        print(f"  {k:26s} {t:7.2f} s  {tokens / t:9.0f} tok/s")
    print(f"  peak memory {peak_memory_gb(args.device):.1f} GiB")


def ab_ckpt_keep(rounds, eps_for, timed, args, cuda, as_json):
    """update() with the attention's outputs kept by checkpointing (model.CKPT_KEEP, the default) against recomputing
    everything (CKPT_KEEP empty), on the same new episodes each round, the order reversed every other round."""
    import json
    import model
    if not args.grad_ckpt:
        raise SystemExit("--ab-ckpt-keep compares two kinds of checkpointing: add --grad-ckpt")
    ways, rows = {"keep attention": model.CKPT_KEEP, "recompute all": []}, []
    for i in range(rounds):
        eps = eps_for(10 + i)
        for way in abba(i, list(ways)):
            model.CKPT_KEEP = ways[way]
            rows.append(dict(round=i, way=way, seconds=timed(eps), tokens=sum(len(e.tokens) for e in eps)))
    model.CKPT_KEEP = ways["keep attention"]
    total = {w: sum(r["seconds"] for r in rows if r["way"] == w) for w in ways}
    cond = dict(device=torch.cuda.get_device_name() if cuda else "cpu", dtype=args.param_dtype, autocast=args.autocast,
                lora_rank=args.lora_rank, micro_batch=args.micro_batch, threads=torch.get_num_threads(),
                torch=torch.__version__)
    if as_json:
        return print(json.dumps(dict(conditions=cond, rounds=rows, total_s=total), indent=1))
    print("update() with checkpointing: " + ", ".join(f"{k}={v}" for k, v in cond.items()))
    print(f"  {'round':>5s} {'way':>15s} {'tokens':>7s} {'s':>8s}")
    for r in rows:
        print(f"  {r['round']:5d} {r['way']:>15s} {r['tokens']:7d} {r['seconds']:8.2f}")
    print("  total: " + ", ".join(f"{w} {t:.1f} s" for w, t in total.items()) +
          f" ({total['keep attention'] / total['recompute all'] - 1:+.1%})")


def alternating(n):
    """Advantages +1, -1, +1, ... (lr is 0, so they only decide which terms the loss keeps)."""
    return [1.0 if i % 2 == 0 else -1.0 for i in range(n)]


def profile_update(model, opt, eps, args, cuda, timed):
    """timed(eps): main's unprofiled update() timing; then the same episodes again under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    plain = timed(eps)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall = timed(eps)
    kern, host, n_kern, _ = profile_totals(prof)  # microseconds
    tokens = sum(len(e.tokens) for e in eps)
    print(f"update() of {len(eps)} episodes ({tokens} tokens, micro-batch {args.micro_batch}, grad-ckpt {args.grad_ckpt}, "
          f"LoRA r={args.lora_rank}), {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}:")
    print(f"  wall {plain:.2f} s unprofiled, {wall:.2f} s profiled; kernels {sum(kern.values()) / 1e6:.2f} s "
          f"({n_kern} launched)")
    for title, c in (("top kernels (s)", kern), ("top host ops, self time (s)", host)):
        print(f"  {title}:")
        for k, v in c.most_common(14):
            print(f"    {v / 1e6:8.3f}  {k[:120]}")


if __name__ == "__main__":
    main()
