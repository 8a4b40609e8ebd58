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
Realistic episodes need a warm-started model: --model runs/grpo/warmstart (the base model rarely calls a tool).
"""
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from env_sql import load_tasks  # noqa: E402
from rollout import run_episodes  # noqa: E402
from train_grpo import build_model, collate, get_args, micro_batch_plan, token_logprobs, update  # noqa: E402


def main():
    as_json, ab, ab_mb = "--json" in sys.argv, "--ab-share-prefix" in sys.argv, "--ab-micro-batches" in sys.argv
    argv = [a for a in sys.argv[1:] if a not in ("--json", "--ab-share-prefix", "--ab-micro-batches")]
    args = get_args(argv + ["--wandb", "off"])
    torch.set_num_threads(args.threads)
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

    rows = [("rollout", t_roll, sampled, "sampled tokens"), ("log-probs", t_lp, total, "episode tokens"),
            ("update", t_up, total, "episode tokens"), ("step", t_roll + t_up, total, "episode tokens")]
    if ab:
        rows.append(("update, no prefix sharing", t_plain, total, "episode tokens"))
    if ab_mb:
        rows.append(("update, unsplit groups", t_unsplit, total, "episode tokens"))
    if as_json:
        print(json.dumps({"conditions": cond, "parts": [{"part": n, "seconds": round(t, 2), "tokens": k,
                                                          "tok_s": round(k / t, 1)} for n, t, k, _ in rows]}, indent=2))
        return
    print("conditions: " + ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 1)}" for k, v in cond.items()))
    print(f"{'part':26s} {'seconds':>8s} {'tokens':>8s} {'tok/s':>8s}  counted")
    for n, t, k, what in rows:
        print(f"{n:26s} {t:8.1f} {k:8d} {k / t:8.1f}  {what}")


if __name__ == "__main__":
    main()
