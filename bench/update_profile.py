"""
Where a GRPO update's time goes (a diagnostic for a lent GPU): the same synthetic episodes (bench/grpo_step.py) go
through train_grpo.update() several times at lr 0, so the weights never change between the timings:
  cuDNN allowed, cold   SDPA may pick cuDNN (train_grpo._update, the peer), on shapes the process has not seen
                        (every real step's micro-batches have new lengths; cuDNN builds a graph per new shape);
  cuDNN allowed, again  the same episodes once more (what is left when per-shape setup is cached);
  update(), new         train_grpo.update as it runs: cuDNN's SDPA excluded, new episodes;
then (--profile) an update of 2 new episodes (one micro-batch) under torch.profiler: kernel time against wall
time, top kernels and host ops. (Profiling a whole 16-micro-batch update did not finish in 4 minutes on an H100.)

    python bench/update_profile.py --random-config qwen3-4b --episodes 32 --length 1600 [--profile] [train_grpo.py flags]
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.generate import profile_totals  # noqa: E402
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
        fn(model, opt, eps, [1.0 if i % 2 == 0 else -1.0 for i in range(len(eps))], args, 0.0, None, True)
        sync()
        return time.perf_counter() - t

    timed(eps_for(99, n=2, L=800))  # allocator, optimizer state, kernels' first launches
    first = eps_for(1)
    tokens = sum(len(e.tokens) for e in first)
    res = [("cuDNN allowed, cold", timed(first, _update)), ("cuDNN allowed, again", timed(first, _update)),
           ("update(), new episodes", timed(eps_for(2))), ("update(), again", timed(eps_for(2)))]
    print(f"update of {n_eps} synthetic episodes, {tokens} tokens, micro-batch {args.micro_batch}, grad-ckpt "
          f"{args.grad_ckpt}, LoRA r={args.lora_rank}, {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")
    for k, t in res:
        print(f"  {k:26s} {t:7.2f} s  {tokens / t:9.0f} tok/s")
    print(f"  peak memory {peak_memory_gb(args.device):.1f} GiB")

    if not prof_on:
        return
    from torch.profiler import ProfilerActivity, profile
    eps = eps_for(3, n=2)
    sync()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        _update(model, opt, eps, [1.0] * len(eps), args, 0.0, None, True)
        sync()
    wall = time.perf_counter() - t
    kern, host, _ = profile_totals(prof)  # microseconds
    print(f"profiled update (2 new episodes, cuDNN on): wall {wall:.2f} s (with profiler), kernels {sum(kern.values()) / 1e6:.2f} s")
    for title, c in (("top kernels (s)", kern), ("top host ops, self time (s)", host)):
        print(f"  {title}:")
        for k, v in c.most_common(14):
            print(f"    {v / 1e6:8.3f}  {k[:120]}")


if __name__ == "__main__":
    main()
