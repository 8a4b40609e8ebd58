"""
One GRPO step split into its parts: rollout (engine), log-prob recomputation (trainer forward, no grad) and the
update (forward + backward + optimizer step), each with its time and tokens/s. Same defaults as train_grpo.py.

    python bench/grpo_step.py [--tasks-per-step 4 --group-size 4 --lora-rank 32] [--ab-share-prefix]
                              [--ab-micro-batches] [--json]

The episodes come from the model itself; the update is timed on the same episodes with advantages +-1 (so every
group counts, whatever the rewards were). --ab-share-prefix also times the same update with --no-share-prefix (every
row runs its whole sequence) on the same episodes, after the timed one: the peer of the shared-prefix forward.
--ab-micro-batches does the same with --no-split-micro-batches (one micro-batch of up to --micro-batch rows per
group, however unequal its episodes). Both peers run at lr 0, so the weights do not change between the timings.
Realistic episodes need a warm-started model: --model runs/grpo/step_64 (the base model rarely calls a tool).

A model without weights worth sampling (Qwen3-4B's shape on a lent GPU) runs on synthetic episodes instead:

    python bench/grpo_step.py --random-config qwen3-4b --synthetic-len 1600 4096 --tasks-per-step 8 --group-size 8 \
        --max-new-tokens 512 --micro-batch 2 --grad-ckpt

--ab-engine-pack first times the rollout turn on an engine that leaves the weights unpacked (a LoRA model's adapters
run as separate matmuls in each decode step), then on the default engine (on CUDA: LoRA merged into packed weights),
and stops there (no log-probs or update).

The rollout is then one turn: each group's prompt (--synthetic-prompt random tokens) prefilled once, forked into its
G rows, and max_new_tokens sampled per row with no stop token, on the engine train_grpo.py allocates (every row x
--max-tokens). The log-probs and update run on episodes of about each --synthetic-len tokens (0.75-1.25x): the
group's prompt, then random tokens of which 16% count as sampled (measured on the default run: 251 of 1,582). Only
the prompt is shared within a group, where real groups share more (their episodes open alike), so the update is
an upper bound. Speed does not depend on the ids. Each part reports its peak memory; the engine stays allocated
through the update, as in train_grpo.py.
"""
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from env_sql import load_tasks  # noqa: E402
from rollout import Episode, run_episodes  # noqa: E402
from train_grpo import build_model, collate, get_args, micro_batch_plan, peak_memory_gb, token_logprobs, update  # noqa: E402


def take(argv, flag, n=1):
    """Remove flag and the n values after it (n=None: all up to the next flag) from argv; return the values."""
    if flag not in argv:
        return None
    i = argv.index(flag)
    j = i + 1
    while j < len(argv) and (j - i <= n if n else not argv[j].startswith("--")):
        j += 1
    vals = argv[i + 1:j]
    del argv[i:j]
    return vals


def add_random_model(argv, name):
    """Append --model DIR to argv: a checkpoint of the named shape (bench/generate.py CONFIGS) with random weights,
    drawn on the --device argv names (default: cuda when there is one)."""
    from bench.generate import CONFIGS, random_model_dir
    if name not in CONFIGS:
        sys.exit(f"error: --random-config {name}: expected one of {', '.join(CONFIGS)}")
    device = argv[argv.index("--device") + 1] if "--device" in argv else ("cuda" if torch.cuda.is_available() else "cpu")
    argv += ["--model", random_model_dir(CONFIGS[name], name, device)]


def synthetic_episodes(tasks_per_step, group_size, prompt_len, length, vocab, max_tokens=None, seed=0):
    """Episodes of random ids: per group a shared prompt of prompt_len, then each episode's own tokens to 0.75-1.25x
    length (at most max_tokens, the episode budget), sampled (mask 1) on 16% of them in runs of 40 (assistant
    messages between tool responses)."""
    g = torch.Generator().manual_seed(seed)
    eps = []
    for t in range(tasks_per_step):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        for _ in range(group_size):
            n = max(int(length * (0.75 + 0.5 * torch.rand(1, generator=g).item())), prompt_len + 2)
            n = min(n, max_tokens or n)
            rest = torch.randint(0, vocab, (n - prompt_len,), generator=g).tolist()
            mask = [0] * prompt_len + [1 if k % 250 < 40 else 0 for k in range(n - prompt_len)]
            eps.append(Episode({"id": f"synthetic{t}"}, prompt + rest, mask, [0.0] * n, prompt_len))
    return eps


def synthetic_step(args, model, rollout_model, lengths, prompt_len, rows_out, ab_pack=False):
    """The rollout as one turn at full batch, then log-probs and update on synthetic episodes of each length.
    ab_pack: first the same turn on an engine that does not pack the weights (a LoRA model's adapters then run as
    separate matmuls in every decode step; the engine's default on CUDA merges them into packed weights)."""
    from model import Engine
    dev, G = args.device, args.group_size
    cuda = dev.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    vocab = model.config.vocab_size
    prompts = [e.tokens[:prompt_len] for e in synthetic_episodes(args.tasks_per_step, 1, prompt_len, prompt_len, vocab)]

    def turn(engine, gen):
        engine.reset()
        sync()
        t = time.perf_counter()
        engine.feed([i * G for i in range(len(prompts))], prompts)
        for i in range(len(prompts)):
            engine.fork(i * G, list(range(i * G + 1, (i + 1) * G)))
        outs = engine.generate(range(engine.B), args.max_new_tokens, args.temperature, generator=gen)
        sync()
        return time.perf_counter() - t, sum(len(o.tokens) for o in outs)

    for pack in ([False, None] if ab_pack else [None]):  # None: the engine's default
        engine = Engine(rollout_model, args.tasks_per_step * G, args.max_tokens + 1, pack=pack)
        packed = rollout_model.lm_head.packed is not None
        print(f"engine ({'packed' if packed else 'not packed'}): {engine.memory_report()}", file=sys.stderr, flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator(dev).manual_seed(args.seed)
        warm, _ = turn(engine, gen)  # on CUDA: compiles the decode step (once, whatever the capacities it reaches)
        t_roll, sampled = turn(engine, gen)
        what = f"rollout, 1 turn x {engine.B} rows" + ("" if packed else ", weights not packed")
        rows_out.append((what, t_roll, sampled, "sampled tokens", peak_memory_gb(dev)))
        rows_out.append((what.replace("rollout", "rollout warm-up (compile)"), warm, sampled, "sampled tokens",
                         peak_memory_gb(dev)))
        # as it is measured: a lease's time limit can cut the run before the table is printed
        print(f"{what}: {t_roll:.2f} s ({sampled / t_roll:.0f} tok/s), warm-up {warm:.1f} s, "
              f"peak {peak_memory_gb(dev):.1f} GiB", file=sys.stderr, flush=True)
        if pack is False:  # free its cache before the next engine allocates one
            del engine
            if cuda:
                torch.cuda.empty_cache()
    if ab_pack:  # the rollout's A/B only
        return
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for L in lengths:
        eps = synthetic_episodes(args.tasks_per_step, G, prompt_len, L, vocab, args.max_tokens)
        total = sum(len(e.tokens) for e in eps)
        adv = [1.0 if i % 2 == 0 else -1.0 for i in range(len(eps))]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast):
            for mb in micro_batch_plan(eps, args):
                ids, mask, _ = collate([eps[i] for i in mb], dev)
                token_logprobs(model, ids, mask, args.temperature, args.logprob_chunk, args.share_prefix)
        sync()
        rows_out.append((f"log-probs, {len(eps)} x ~{L} tokens", time.perf_counter() - t0, total, "episode tokens",
                         peak_memory_gb(dev)))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        update(model, opt, eps, adv, args, args.lr)
        sync()
        rows_out.append((f"update, {len(eps)} x ~{L} tokens", time.perf_counter() - t0, total, "episode tokens",
                         peak_memory_gb(dev)))


def main():
    as_json, ab, ab_mb = "--json" in sys.argv, "--ab-share-prefix" in sys.argv, "--ab-micro-batches" in sys.argv
    ab_pack = "--ab-engine-pack" in sys.argv
    argv = [a for a in sys.argv[1:] if a not in ("--json", "--ab-share-prefix", "--ab-micro-batches", "--ab-engine-pack")]
    random_config = take(argv, "--random-config")
    lengths = [int(x) for x in take(argv, "--synthetic-len", None) or []]
    prompt_len = int((take(argv, "--synthetic-prompt") or [700])[0])
    if random_config:
        if not lengths:
            sys.exit("error: --random-config needs --synthetic-len (a random model's rollouts are not episodes)")
        add_random_model(argv, random_config[0])
    args = get_args(argv + ["--wandb", "off"])
    torch.set_num_threads(args.threads)
    if lengths:
        model, rollout_model = build_model(args)
        rows = []
        synthetic_step(args, model, rollout_model, lengths, prompt_len, rows, ab_pack)
        cond = {"model": random_config[0] if random_config else args.model, "device": args.device,
                "threads": args.threads, "lora_rank": args.lora_rank, "grad_ckpt": args.grad_ckpt,
                "micro_batch": args.micro_batch, "tasks_per_step": args.tasks_per_step, "group_size": args.group_size,
                "max_tokens": args.max_tokens, "max_new_tokens": args.max_new_tokens, "prompt_tokens": prompt_len,
                "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()}
        print_rows(cond, rows, as_json)
        return
    if not os.path.exists(args.tasks):
        from data.synth import ensure_synth
        ensure_synth(os.path.dirname(args.tasks))
    tasks = [t for t in load_tasks(args.tasks) if t["split"] == "train" and t["kind"] == "single_table"][: args.tasks_per_step]
    model, rollout_model = build_model(args)
    from model import Engine, load_tokenizer
    tok = load_tokenizer(args.model)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    engine = Engine(rollout_model, len(tasks) * args.group_size, args.max_tokens + 1)  # one, as train_grpo.py has
    # warm-up: on CPU it packs the weights; on CUDA a whole rollout, which compiles the decode step at each capacity
    run_episodes(rollout_model, tok, tasks[:1], 1, max_new_tokens=4, engine=engine)
    if args.device.startswith("cuda"):
        run_episodes(rollout_model, tok, tasks, args.group_size, args.max_turns, args.max_tokens, args.max_new_tokens,
                     args.temperature, args.top_k, args.top_p, gen, engine)

    t0 = time.perf_counter()
    eps = run_episodes(rollout_model, tok, tasks, args.group_size, args.max_turns, args.max_tokens, args.max_new_tokens,
                       args.temperature, args.top_k, args.top_p, gen, engine)
    t_roll = time.perf_counter() - t0
    sampled = sum(sum(e.mask) for e in eps)
    total = sum(len(e.tokens) for e in eps)

    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu" if args.device == "cpu" else "cuda", dtype=torch.bfloat16, enabled=args.autocast):
        for i in range(0, len(eps), args.micro_batch):
            ids, mask, _ = collate(eps[i:i + args.micro_batch], args.device)
            token_logprobs(model, ids, mask, args.temperature, args.logprob_chunk)
    t_lp = time.perf_counter() - t0

    cond = {"model": args.model, "device": args.device, "threads": args.threads,
            "lora_rank": args.lora_rank, "episodes": len(eps), "tasks_per_step": args.tasks_per_step,
            "group_size": args.group_size, "mean_episode_tokens": total / len(eps), "machine": platform.processor() or platform.machine()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    adv = [1.0 if i % 2 == 0 else -1.0 for i in range(len(eps))]
    t0 = time.perf_counter()
    update(model, opt, eps, adv, args, args.lr)
    t_up = time.perf_counter() - t0
    if ab:  # the same update on the same episodes with every row run in full (lr 0: the weights stay as they were)
        args.share_prefix = False
        t0 = time.perf_counter()
        update(model, opt, eps, adv, args, 0.0)
        t_plain = time.perf_counter() - t0
        args.share_prefix = True
    if ab_mb:  # the same update with one micro-batch per group (up to --micro-batch rows), however unequal
        cond["micro_batch_rows"] = {}
        for split in (True, False):  # the cut update() makes, as episode lengths; the last (unsplit) stays set
            args.split_micro_batches = split
            cond["micro_batch_rows"]["split" if split else "unsplit"] = [
                [len(eps[i].tokens) for i in mb] for mb in micro_batch_plan(eps, args)]
        t0 = time.perf_counter()
        update(model, opt, eps, adv, args, 0.0)
        t_unsplit = time.perf_counter() - t0

    peak = peak_memory_gb(args.device)
    rows = [("rollout", t_roll, sampled, "sampled tokens", peak), ("log-probs", t_lp, total, "episode tokens", peak),
            ("update", t_up, total, "episode tokens", peak), ("step", t_roll + t_up, total, "episode tokens", peak)]
    if ab:
        rows.append(("update, no prefix sharing", t_plain, total, "episode tokens", peak))
    if ab_mb:
        rows.append(("update, unsplit groups", t_unsplit, total, "episode tokens", peak))
    print_rows(cond, rows, as_json)


def print_rows(cond, rows, as_json):
    """rows: (part, seconds, tokens, what the tokens are, peak memory GiB: the process's so far on CPU, the part's on
    CUDA)."""
    if as_json:
        print(json.dumps({"conditions": cond, "parts": [{"part": n, "seconds": round(t, 2), "tokens": k,
                                                          "tok_s": round(k / t, 1), "peak_gib": round(m, 2)}
                                                         for n, t, k, _, m in rows]}, indent=2))
        return
    print("conditions: " + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 1)}" for k, v in cond.items()))
    print(f"{'part':34s} {'seconds':>8s} {'tokens':>8s} {'tok/s':>8s} {'peak GiB':>8s}  counted")
    for n, t, k, what, m in rows:
        print(f"{n:34s} {t:8.1f} {k:8d} {k / t:8.1f} {m:8.1f}  {what}")


if __name__ == "__main__":
    main()
