"""
GRPO for tool discipline: sample G multi-turn episodes per task in the SQL environment, grade them, and push the
policy toward the group's better episodes. One readable loop.

    python train_grpo.py                                   # SmolLM2-135M, synthetic single-table tasks, CPU
    python train_grpo.py --model path/to/Qwen3-4B-Instruct-2507 --lora-rank 32 --tasks-per-step 16 --group-size 8

Each step: sample --tasks-per-step training tasks, run --group-size episodes of each (rollout.py), grade them (1 for
the right number, else 0, and -0.5 for a wrong answer made of a number never read: --guess-penalty), compute
group-relative advantages A = (r - mean_g) / (std_g + eps) (or r - mean_g with --no-scale-std, Dr. GRPO), drop groups
whose rewards are all equal, and take one optimizer step (or --mu steps) on the clipped surrogate
    l = -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A),  rho = exp(logp - logp_old)
weighted per token by the truncated importance weight min(exp(logp_old - logp_rollout), --is-cap), which covers the
mismatch between the engine's and the trainer's log-probs, plus an optional k3 KL penalty to the reference: the
policy the GRPO phase started from (the warm start's checkpoint, --init-from's, or the base model).
--sft-steps N first clones the oracle's trajectories (the same loss with advantage 1: the expert warm start).
Checkpoints: OUT/step_N in HF format (LoRA merged) with trainer_state.pt; --resume continues a killed run exactly.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import random
import resource
import shutil
import sys
import time

import numpy as np
import torch

from env_sql import SQLEnv, load_task_files, rubric_rates
from model import (DEFAULT_MODEL, Engine, adapters_disabled, adapters_loaded, add_lora, default_dtype, filter_logits,
                   from_pretrained, load_tokenizer, packs_bypassed, resolve_model_path, save_pretrained)
from rollout import common_prefix_len, episode_from_messages, run_episodes

# -----------------------------------------------------------------------------
# GRPO math (each function is checked against hand-computed cases in tests/test_grpo.py)


def group_advantages(rewards, scale_std=True, eps=1e-6):
    """rewards (T, G) -> advantages (T, G) and keep (T,): groups whose rewards are not all equal. Std is the sample
    std (as TRL and verl); without scaling (Dr. GRPO) the advantage is r - mean."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True, unbiased=True)
    adv = rewards - mean
    if scale_std:
        adv = adv / (std + eps)
    keep = (rewards.max(1).values - rewards.min(1).values) > 0
    return adv, keep


def episode_rewards(eps, table_reward=0.0, repeat_penalty=0.0, giveup_penalty=0.0, ungrounded_penalty=0.0,
                    guess_penalty=0.0):
    """The reward GRPO optimizes: 1 for a correct answer; else table_reward if the episode answered and the first
    table it opened holds the answer (the rubric's first_table_right); else 0. Minus repeat_penalty if the episode
    repeated a call (the rubric's repeated_call). Minus giveup_penalty if it is not correct and its next call after
    its first empty result was the calculator or none (the rubric's gave_up_after_empty); a correct answer is never
    charged for it, since a stray empty query before the right one costs nothing. Three ablations (0 = the answer
    alone): a wrong first table is the warm start's most common failure, and one first pick cannot be farmed; a loop
    of identical calls ends at the turn limit with the same 0 as a slow episode, so without the penalty GRPO cannot
    tell the two apart; nor can it tell an agent that stopped looking after "(no rows)" from one that looked on.
    Minus ungrounded_penalty if it is not correct and did not answer with a number it read (the rubric's
    ungrounded_answer, or no answer at all): one charge for every way of ending without the data's number, so that
    avoiding one of them by another (the giveup penalty's failure) earns nothing, while a wrong number that was read
    keeps 0. Minus guess_penalty if it is not correct and answered with a number it did not read (ungrounded_answer
    alone): the one penalty that ranks a made-up answer below running out of turns. With the answer alone as the
    reward the two score the same 0, and a guess is sometimes right, so GRPO turns cut episodes into guesses (the
    rubric's hallucinated and ungrounded rates rose under it)."""
    def reward(e):
        if e.reward > 0:
            return e.reward
        base = 0.0 if e.truncated else table_reward * bool(e.rubric.get("first_table_right"))
        guessed = bool(e.rubric.get("ungrounded_answer"))
        unread = guessed or not e.rubric.get("answered")
        return (base - giveup_penalty * bool(e.rubric.get("gave_up_after_empty")) - ungrounded_penalty * unread
                - guess_penalty * guessed)
    return torch.tensor([reward(e) - repeat_penalty * bool(e.rubric.get("repeated_call")) for e in eps])


# episode_rewards' shaping terms, each the flag of the same name: grade_groups passes them, the run's header names them
REWARD_TERMS = ("table_reward", "repeat_penalty", "giveup_penalty", "ungrounded_penalty", "guess_penalty")


def grade_groups(eps, args):
    """A step's episodes (tasks x --group-size, group by group) -> rewards (T, G) under the reward flags, their
    group-relative advantages (T, G) and keep (T,)."""
    rewards = episode_rewards(eps, **{k: getattr(args, k) for k in REWARD_TERMS})
    rewards = rewards.view(-1, args.group_size)
    return (rewards, *group_advantages(rewards, args.scale_std, args.adv_eps))


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || ref): exp(d) - d - 1 with d = ref - logp, clamped as verl does."""
    d = (ref_logp - logp).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(max=10)


def policy_loss(logp, old_logp, rollout_logp, adv, mask, clip_low=0.2, clip_high=0.28, is_cap=2.0, agg="token-mean",
                n_tokens=None, n_seqs=None, norm_len=1024, kl_beta=0.0, ref_logp=None):
    """logp, old_logp, rollout_logp, ref_logp, mask: (B, T); adv: (B,). n_tokens / n_seqs: the whole batch's masked
    token and sequence counts, so that micro-batches add up to the batch's loss. Returns (loss, stats)."""
    m = mask.float()
    n_tokens = n_tokens or m.sum().clamp(min=1)
    n_seqs = n_seqs or logp.shape[0]
    ratio = torch.exp(logp - old_logp)
    A = adv[:, None]
    surrogate = -torch.min(ratio * A, ratio.clamp(1 - clip_low, 1 + clip_high) * A)
    w = torch.exp(old_logp - rollout_logp).clamp(max=is_cap).detach() if is_cap > 0 else torch.ones_like(logp)
    per_token = w * surrogate
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if kl_beta > 0:
        per_token = per_token + kl_beta * kl
    if agg == "token-mean":
        loss = (per_token * m).sum() / n_tokens
    elif agg == "seq-mean-token-mean":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum() / n_seqs
    elif agg == "seq-mean-token-sum-norm":
        loss = (per_token * m).sum() / (n_seqs * norm_len)
    else:
        raise ValueError(f"--loss-agg {agg!r}; expected token-mean, seq-mean-token-mean or seq-mean-token-sum-norm")
    clipped = ((ratio < 1 - clip_low) & (A < 0)) | ((ratio > 1 + clip_high) & (A > 0))
    stats = {"clip_frac": (clipped.float() * m).sum().item(), "kl": (kl * m).sum().item(),
             "is_weight": (w * m).sum().item(), "tokens": m.sum().item()}
    return loss, stats


def _chunk_logp(model, h, targets, temperature, top_k=0, top_p=1.0):
    """Log-probs of the targets under the distribution the engine sampled from: logits / temperature, restricted to
    the same top-k / top-p set (model.sample); the target itself always stays in the set."""
    logits = model.lm_head(h).float() / temperature  # (n, V) for this chunk only
    logits = filter_logits(logits, top_k, top_p, keep=targets)
    logz = logits.logsumexp(-1)
    logp = logits.gather(-1, targets[:, None])[:, 0] - logz
    p = torch.softmax(logits.detach(), -1)
    entropy = logz.detach() - (p * logits.detach().clamp(min=torch.finfo(torch.float32).min)).sum(-1)  # 0 * -inf
    return logp, entropy


def shared_prefix_len(ids):
    """How many leading tokens all rows of ids (B, T) share, at most T - 1 (0 for a single row)."""
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(0)  # (T,)
    return min(int(same.long().cumprod(0).sum()), ids.shape[1] - 1)


def token_logprobs(model, ids, mask, temperature=1.0, chunk=512, share_prefix=True, top_k=0, top_p=1.0):
    """ids (B, L), mask (B, L-1) over targets ids[:, 1:] -> (logp (B, L-1), entropy (B, L-1)), filled only where
    mask is 1. The vocabulary projection runs on the masked positions only, chunk rows at a time and (with grad)
    checkpointed, so a (B, L, V) float32 tensor never exists.
    share_prefix: the P leading input tokens all rows share run once (Transformer.hidden's prefix_len): the prompt,
    and also the turns a group's episodes sampled alike (a warm-started policy opens its episodes with the same
    calls). Positions before P - 1 have the same history and the same target in every row, so their log-probs are
    taken once and each row reads them where its mask is 1 (autograd sums the rows' gradients into them); position
    P - 1 has a shared history but each row's own target."""
    x, tgt = ids[:, :-1], ids[:, 1:]  # inputs and targets (B, T), T = L - 1
    B, T = x.shape
    P = shared_prefix_len(x) if share_prefix else 0
    S = max(P - 1, 0)  # positions scored once for all rows
    if P:
        hp, hs = model.hidden(x, prefix_len=P)  # (1, P, C), (B, T - P, C)
        hs = torch.cat([hp[:, P - 1:].expand(B, -1, -1), hs], 1)  # (B, T - S, C): position P - 1 is per row
        hp = hp[0, :S]  # (S, C)
    else:
        hs = model.hidden(x)  # (B, T, C)
    sel = mask.bool()
    sel_p, sel_s = sel[:, :S].any(0), sel[:, S:]  # (S,), (B, T - S)
    h = torch.cat([hp[sel_p], hs[sel_s]]) if S else hs[sel_s]  # (n_p + n_s, C)
    tg = torch.cat([tgt[0, :S][sel_p], tgt[:, S:][sel_s]])  # (n_p + n_s,)
    lps, ents = [], []
    for i in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled():
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_logp, model, h[i:i + chunk], tg[i:i + chunk], temperature,
                                                        top_k, top_p, use_reentrant=False)
        else:
            lp, ent = _chunk_logp(model, h[i:i + chunk], tg[i:i + chunk], temperature, top_k, top_p)
        lps.append(lp)
        ents.append(ent)
    n_p, out = int(sel_p.sum()), []
    for vals in (lps, ents):
        v = torch.cat(vals) if vals else torch.zeros(0, device=ids.device)
        # the shared positions' values (S,), read by each row where its mask is 1, then each row's own (B, T - S)
        shared = torch.zeros(S, device=ids.device).masked_scatter(sel_p, v[:n_p])
        own = torch.zeros(B, T - S, device=ids.device).masked_scatter(sel_s, v[n_p:])
        out.append(torch.cat([torch.where(sel[:, :S], shared[None], 0.0), own], 1))
    return out[0], out[1]


def micro_batches(seqs, cap, split=True):
    """seqs: token lists sorted by length -> lists of indices, runs of at most cap consecutive rows, that minimize the
    tokens the training forward computes: a micro-batch's shared prefix P once (token_logprobs), then each row's
    rest padded to its longest row, P + n (longest - P). One episode that looped to the turn limit (2,600 tokens)
    padded with seven of ~1,600 costs more than running it alone (estimated from the plan run's rollout
    transcripts: 14% fewer tokens than one micro-batch per group over its updates).
    split=False: consecutive runs of cap rows."""
    n = len(seqs)
    if not split:
        return [list(range(i, min(i + cap, n))) for i in range(0, n, cap)]
    lcp = [[0] * n for _ in range(n)]  # lcp[i][j] (i < j): tokens rows i and j share
    for i in range(n):
        for j in range(i + 1, n):
            lcp[i][j] = common_prefix_len([seqs[i], seqs[j]])
    # best[j]: the cost of the cheapest split of rows [0, j); its last run starts at cut[j]
    best, cut = [0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - cap), j):  # the run [i, j): its prefix is what row i shares with every other
            P = min(lcp[i][i + 1:j]) if j - i > 1 else 0
            cost = best[i] + P + (j - i) * (len(seqs[j - 1]) - P)
            if cost < best[j]:  # strict: on a tie the longer run (found first) stays
                best[j], cut[j] = cost, i
    out, j = [], n
    while j:
        out.append(list(range(cut[j], j)))
        j = cut[j]
    return out[::-1]


def collate(episodes, device):
    """Right-pad episodes into tensors: ids (B, L); mask and rollout log-probs (B, L-1) aligned with ids[:, 1:]."""
    L = max(len(e.tokens) for e in episodes)
    B = len(episodes)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L - 1)
    rlp = torch.zeros(B, L - 1)
    for i, e in enumerate(episodes):
        n = len(e.tokens)
        ids[i, :n] = torch.tensor(e.tokens)
        mask[i, : n - 1] = torch.tensor(e.mask[1:], dtype=torch.float32)
        rlp[i, : n - 1] = torch.tensor(e.logprobs[1:], dtype=torch.float32)
    return ids.to(device), mask.to(device), rlp.to(device)


# -----------------------------------------------------------------------------
# Arguments


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", default=DEFAULT_MODEL, help="HF model directory or 'smollm2-135m'")
    a("--tasks", nargs="+", default=["data/generated/synth/tasks.jsonl"],
      help="one or more tasks.jsonl (the default is built if absent); several mix datasets (synthetic + TAT-QA ...)")
    a("--train-split", default="train")
    a("--train-kind", default="single_table", choices=["single_table", "multi_table", "all"],
      help="train on these tasks only (the seed trained on single-table questions)")
    a("--val-split", default="val")
    a("--out", default="runs/grpo")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a("--init-from", default=None, metavar="CKPT",
      help="start from another run's checkpoint (its weights, LoRA, optimizer, step and task counts) with this run's "
           "--seed: GRPO seeds and ablations from one shared warm start (e.g. runs/grpo/step_64). With that run's own "
           "--seed its first draws come again (said at the start). With --resume, a checkpoint in --out wins")
    a("--seed", type=int, default=0)
    # phases
    a("--sft-steps", type=int, default=64,
      help="expert warm start: behavior cloning of oracle episodes first. 64 steps scored 41.2%% greedy on 80 test "
           "tasks where the same run's first 40 scored 15.0%% (seed 0, fp32), and 45.0%% against 20.0%% in make run "
           "(bf16; a chain of 40 + 12 + 12 steps 45.0%%); "
           "the largest lever measured, though not monotone: the fp32 run's step 72 scored 33.8%% (bench/RESULTS.md)")
    a("--sft-batch", type=int, default=8, help="oracle episodes per warm-start step")
    a("--sft-detours", type=float, default=0.5,
      help="fraction of oracle episodes that first open a wrong table (half of them also query it), with those turns "
           "left out of the loss: demonstrations of recovery. With the plan, the warm start scored 23.7%% greedy on 80 "
           "test tasks against 6.2%% without detours, following the empty result's 'Found in' note; without the plan "
           "(0 was the default then), 3.7%% vs 5.0%% (bench/RESULTS.md)")
    a("--sft-misreads", type=float, default=0.0,
      help="fraction of oracle episodes that first ask for their first cell by a near-miss label ('Net property, plant "
           "and equipment', 'Total net income') in the right table and then by the label the empty result's note "
           "offers, the miss left out of the loss (train_grpo.pick_misread); the rest may take a table detour "
           "(--sft-detours). Off: warm-started plans name labels from memory in about 2 of 5 cells, but 10 warm-start "
           "steps at 1.0 scored 5 to 11 points under 10 plain ones on 80 test tasks, repeating calls more "
           "(bench/RESULTS.md)")
    a("--sft-plan", nargs="?", default="early", const="early", choices=["off", "early", "late"],
      help="the oracle episodes say their plan: the cells to read and the answer as an expression in them, the table's "
           "description before opening it, and a lookup answers without the calculator (eval.plan_text, "
           "eval.oracle_episode). early (the default, and the value when the flag is given alone): the plan comes before "
           "listing the tables, naming row labels not yet read; late: it comes with the first query, after the labels "
           "were printed (an ablation: its warm start scored 7.5%% greedy against the early plan's 23.7%%, reading real "
           "but wrong labels); off: the straight oracle (the earlier default: 5.0%%; bench/RESULTS.md)")
    a("--sft-quote-labels", action="store_true",
      help="the oracle's plan writes each row label as the SQL literal its query will hold (a = 'Net income' (y2023)), "
           "so a label copied from the plan ends at the quote, as one copied from an empty result's note does. Off by "
           "default until a warm start with it is measured: 10 warm-start steps of --sft-misreads from unquoted plans "
           "left 118 of 124 failed test queries running past the label into the plan's text "
           "(item = 'Net income (y2023); answer = a / b; bench/RESULTS.md)")
    a("--steps", type=int, default=20,
      help="GRPO steps after the warm start. Greedy on all 350 single-table test tasks, from make run's warm start: "
           "20 steps with the answer alone as the reward added +8.3 and +5.7 points (seeds 0 and 1), +10.9 and -4.0 "
           "at --temperature 1.0 (seeds 1 and 2), and 40 steps at 1.0 +16.0 and +11.4 (~104 minutes of GRPO); with "
           "--guess-penalty 0.5 +11.7 and +12.9 (seeds 0 and 1), and 40 steps +22.3 (seed 1; 108 minutes of GRPO "
           "on the AVX-512 VM). On the older 80-task sample the 20-step runs showed +0.0. 64 + 20 steps took 104 "
           "minutes in make run on a 2-core AVX-512 VM, ~77 on the 2-core AMX VM by its step times, before "
           "--guess-penalty, which makes GRPO ~1.3x as long (bench/RESULTS.md)")
    a("--tasks-per-step", type=int, default=4,
      help="tasks drawn per GRPO step, each run --group-size times. 4 x 4 (16 episodes, as 2 x 8 before) took the "
           "same time and, from one warm start, added +5.9, +11.0, -2.7 and -9.4 points greedy on 255 test tasks in "
           "four seeds (mean +1.2; a fifth -5.0 on 80 tasks), where 2 x 8 added +4.7, -4.7 and -14.9 (mean -5.0) and 8 x 2 +2.0 (its groups "
           "of 2 had no signal 72%% of the time) (bench/RESULTS.md)")
    a("--task-sampling", default="uniform", choices=["uniform", "learnability"],
      help="GRPO tasks: uniform over the train tasks, or by learnability: a template is drawn with weight p (1 - p), "
           "p its pass rate so far in rollouts (Beta(1, 1) prior), then one of its tasks; groups with p near 0 or 1 "
           "have equal rewards and teach nothing. Measured twice, not adopted: no more groups with signal, as at a low "
           "entropy a task's episodes pass or fail together whatever its template's pass rate (bench/RESULTS.md)")
    a("--group-size", type=int, default=4, help="episodes per task; >= 2 (the advantage is relative to the group)")
    # rollouts
    a("--max-turns", type=int, default=8)
    a("--repeat-note", action=argparse.BooleanOptionalAction, default=False,
      help="a tool call identical to an earlier one says so after its result (env_sql.SQLEnv.call), in rollouts and "
           "validation; eval.py takes the same flag. Measured (bench/RESULTS.md): at test time it took 4 x 4 seed 1 "
           "from 31.4%% to 29.0%% greedy on 255 test tasks (the model ignores it); trained with it, the same seed "
           "scored 18.0%%")
    a("--max-tokens", type=int, default=4096, help="token budget of one episode, prompt included")
    a("--max-new-tokens", type=int, default=128, help="cap of one assistant message")
    a("--temperature", type=float, default=0.7,
      help="rollout sampling temperature (rLLM's FinQA recipe: 0.6); the trainer's log-probs use the same. 1.0 "
           "from make run's warm start, greedy on all 350 single-table test tasks after 20 steps: seed 1 +10.9 points "
           "against +5.7 at 0.7 on the same task draws, seed 2 -4.0 (repeating calls); two seeds each average +3.5 "
           "at 1.0 and +7.0 at 0.7, and +13.7 at 1.0 after 40 steps. Steps ~1.5x as long at 1.0 (bench/RESULTS.md)")
    a("--top-p", type=float, default=1.0)
    a("--top-k", type=int, default=0)
    # loss
    a("--clip-low", type=float, default=0.2)
    a("--clip-high", type=float, default=0.28)
    a("--is-cap", type=float, default=2.0, help="truncated importance weight cap (0 = off)")
    a("--kl-beta", type=float, default=0.0,
      help="k3 KL penalty to the policy GRPO started from: the warm start's checkpoint (OUT/step_<sft-steps>), else "
           "--init-from's, else the base model (0 = off)")
    a("--loss-agg", default="seq-mean-token-mean", choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
      help="how GRPO's loss weighs rollouts (the warm start's cloning is always token-mean). seq-mean-token-mean "
           "(default): every episode weighs the same. token-mean lets a long failed recovery put "
           "more negative tokens in the loss than a short failed guess: from the same warm start, 10 steps of it fell "
           "23.7%% -> 12.5%% greedy on 80 test tasks, against 20.0%% with seq-mean-token-mean (bench/RESULTS.md)")
    a("--norm-len", type=int, default=1024, help="the constant L of seq-mean-token-sum-norm")
    a("--scale-std", action=argparse.BooleanOptionalAction, default=True, help="divide advantages by the group std")
    a("--adv-eps", type=float, default=1e-6)
    a("--mu", type=int, default=1, help="optimizer steps per batch (old log-probs recomputed when > 1)")
    a("--mask-truncated", action="store_true", help="leave truncated episodes out of the loss (default: reward 0)")
    a("--table-reward", type=float, default=0.0,
      help="reward of a wrong answer whose episode opened a table that holds the answer first (0 = the answer alone). "
           "An ablation: at 0.5, 26%% of groups had signal (25%% without) and test greedy fell 5.0%% -> 3.7%% "
           "(bench/RESULTS.md)")
    a("--repeat-penalty", type=float, default=0.0,
      help="subtracted from the reward of an episode that made a call identical to an earlier one (rubric "
           "repeated_call; 0 = off). An ablation: at 0.25 on the plan recipe, test episodes that repeat a call fell "
           "13.8%% -> 0%% but greedy accuracy only rose 6.2%% -> 7.5%% (bench/RESULTS.md)")
    a("--giveup-penalty", type=float, default=0.0,
      help="subtracted from the reward of a wrong or unfinished episode whose next call after its first empty query "
           "result was the calculator or none (rubric gave_up_after_empty; 0 = off). An ablation: at 0.25, 20 steps "
           "from the best warm start (seed 1) scored 18.0%% greedy on 255 test tasks against 27.5%% without it: GRPO "
           "avoided empty results by guessing names instead (bench/RESULTS.md)")
    a("--ungrounded-penalty", type=float, default=0.0,
      help="subtracted from the reward of a wrong or unfinished episode that did not answer with a number it read from "
           "the database (rubric ungrounded_answer, or no answer; 0 = off). An ablation: at 0.25, 20 GRPO steps "
           "from the fp32 warm start scored 8.7%% greedy on 80 test tasks against the answer alone's 16.2%%, answering "
           "less rather than right (bench/RESULTS.md)")
    a("--guess-penalty", type=float, default=0.5,
      help="subtracted from the reward of a wrong episode that answered with a number it did not read from the "
           "database (rubric ungrounded_answer; 0 = the answer alone). Unlike --ungrounded-penalty, running out of "
           "turns is not charged, so a made-up answer scores below an honest failure. Greedy on all 350 single-table "
           "test tasks, 20 steps from make run's warm start: +11.7 and +12.9 over the warm start on seeds 0 and 1 "
           "against +8.3 and +5.7 with 0 (+7.1 on the same task draws, seed 1), answered without one successful "
           "query 0.009 and 0.003 against 0.086 and 0.054; GRPO ~1.3x as long, fewer groups being dropped "
           "for equal rewards (bench/RESULTS.md)")
    # optimization
    a("--lr", type=float, default=5e-5,
      help="GRPO learning rate (the default suits LoRA; full fine-tuning wants ~10x less). On two warm starts and seed "
           "0, 20 steps at 5e-5 added +2.5 and +11.2 points greedy on 80 test tasks where 1e-4 on the same rollouts' "
           "seed added -5.0 and +2.5; 30 steps at 5e-5 added +8.7 and +13.8. 3e-4 collapsed the policy: 5.9%% greedy "
           "on 255 test tasks against 15.7%% at 1e-4 on the same task draws (bench/RESULTS.md)")
    a("--sft-lr", type=float, default=4e-4, help="warm-start learning rate")
    a("--warmup", type=int, default=5)
    a("--schedule", default="constant", choices=["constant", "cosine"])
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--micro-batch", type=int, default=8,
      help="episodes per forward/backward (at most one group's: the tokens a group shares run once per micro-batch)")
    a("--split-micro-batches", action=argparse.BooleanOptionalAction, default=True,
      help="cut a group where separate micro-batches run fewer tokens (a long episode padded with short ones costs "
           "more than run alone); off: consecutive runs of --micro-batch rows")
    a("--logprob-chunk", type=int, default=512, help="positions per vocabulary-projection chunk")
    a("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
      help="run the tokens a micro-batch's rows share (prompt, identical turns) once in the trainer's forward")
    a("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
      help="activation checkpointing per block (default: on where the CPU runs fp32, whose activations are twice "
           "bf16's: without it the default run's first warm-start step was killed at 24 GB of RSS)")
    a("--lora-rank", type=int, default=32, help="0 = full fine-tuning")
    a("--lora-alpha", type=float, default=None, help="default 2 x rank")
    a("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    # bf16 by default where it pays (model.bf16_fast: CUDA, or a CPU with AMX / AVX-512); on an AVX2-only CPU its
    # matmuls ran 4-7x slower than fp32, so there every default is fp32
    a("--param-dtype", default=None, choices=["float32", "bfloat16"],
      help="dtype of the weights (default float32 for full fine-tuning; under LoRA bfloat16 where bf16 is fast)")
    a("--autocast", action=argparse.BooleanOptionalAction, default=None,
      help="bf16 autocast in the training forward (default: on where bf16 is fast)")
    a("--rollout-dtype", default=None, choices=["float32", "bfloat16"],
      help="rollouts run on a copy in this dtype when it differs from the weights' (default: bfloat16 where bf16 is "
           "fast, else float32)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--threads", type=int, default=os.cpu_count())
    # evaluation, checkpoints, logging
    a("--eval-every", type=int, default=40, help="validate every N GRPO steps, and at the end of each phase")
    a("--eval-tasks", type=int, default=24,
      help="val tasks per evaluation (greedy, one sample); 0: no validation (eval.py on saved checkpoints instead)")
    a("--save-every", type=int, default=10)
    a("--keep", type=int, default=2, help="checkpoints kept (the newest), besides the warm start's (step --sft-steps)")
    a("--wandb", default="offline", choices=["offline", "online", "off"])
    a("--stop-at", type=int, default=None, help="stop after this global step with a checkpoint (continue with --resume)")
    args = ap.parse_args(argv)
    if args.group_size < 2:
        ap.error(f"--group-size must be >= 2 for group-relative advantages (got {args.group_size})")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device!r}: not a torch device (expected cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device here (torch {torch.__version__}); use --device cpu")
    for flag in ("tasks_per_step", "micro_batch", "mu", "eval_every", "save_every", "keep", "threads"):
        if getattr(args, flag) < 1:  # eval_every and save_every are step periods: 0 would divide by zero
            ap.error(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if not 0 <= args.sft_detours <= 1:
        ap.error(f"--sft-detours is a fraction in [0, 1] (got {args.sft_detours})")
    if not 0 <= args.sft_misreads <= 1:
        ap.error(f"--sft-misreads is a fraction in [0, 1] (got {args.sft_misreads})")
    args.sft_plan = None if args.sft_plan == "off" else args.sft_plan
    args.lora_alpha = args.lora_alpha or 2 * args.lora_rank
    fast = default_dtype(args.device)
    args.param_dtype = args.param_dtype or (fast if args.lora_rank else "float32")
    args.rollout_dtype = args.rollout_dtype or fast
    args.autocast = fast == "bfloat16" if args.autocast is None else args.autocast
    args.grad_ckpt = (fast == "float32" and args.device == "cpu") if args.grad_ckpt is None else args.grad_ckpt
    return args


# -----------------------------------------------------------------------------
# Model, optimizer, checkpoints


def build_model(args, ckpt=None):
    """The policy (full fine-tuning: weights from ckpt when resuming) and, when its dtype differs, the rollout copy."""
    dtype = getattr(torch, args.param_dtype)
    src = ckpt if (ckpt and not args.lora_rank) else args.model
    model = from_pretrained(src, dtype=dtype, device=args.device)
    if args.lora_rank:
        add_lora(model, args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")))
    model.gradient_checkpointing = args.grad_ckpt
    model.source_dir = resolve_model_path(args.model)  # tokenizer files come from the base model
    rollout_model = model
    if args.rollout_dtype != args.param_dtype and not args.lora_rank:
        rollout_model = copy.deepcopy(model).to(getattr(torch, args.rollout_dtype))
    return model, rollout_model


def make_optimizer(params, args):
    """AdamW; --weight-decay is decoupled (each step multiplies the weights by 1 - lr * weight_decay). The learning
    rate is set per step by lr_at."""
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))


def select_tasks(all_tasks, args):
    """The training tasks (--train-split, of --train-kind) and --eval-tasks validation tasks of --val-split, drawn
    across companies, the same for a given --seed."""
    train = [t for t in all_tasks if t.get("split") == args.train_split and args.train_kind in ("all", t["kind"])]
    val = [t for t in all_tasks if t.get("split") == args.val_split]
    val = random.Random(args.seed).sample(val, min(args.eval_tasks, len(val)))
    if not train:
        have = sorted({f"{t.get('split')}/{t['kind']}" for t in all_tasks})
        sys.exit(f"error: {' + '.join(args.tasks)} has no tasks with split {args.train_split!r} and kind {args.train_kind!r} "
                 f"(it has split/kind: {', '.join(have)}; see --train-split, --train-kind)")
    if args.sft_steps and not any("expr" in t for t in train):
        sys.exit(f"error: --sft-steps {args.sft_steps}: no training task in {' + '.join(args.tasks)} has an oracle derivation "
                 f"(gold_cells and expr) to clone; use --sft-steps 0")
    return train, val


@torch.no_grad()
def sync_rollout_model(model, rollout_model):
    """Copy the updated weights into the rollout copy (in place: the engine's packed weights notice the change)."""
    if rollout_model is model:
        return
    for p, q in zip(model.parameters(), rollout_model.parameters()):
        q.copy_(p)


def lr_at(step, args):
    """Warm start: --sft-lr after --warmup steps of linear warmup. GRPO: --lr, warmup again, then constant or cosine."""
    if step < args.sft_steps:
        return args.sft_lr * min(1.0, (step + 1) / max(args.warmup, 1))
    s = step - args.sft_steps
    warm = min(1.0, (s + 1) / max(args.warmup, 1))
    if args.schedule == "cosine":
        return args.lr * warm * 0.5 * (1 + math.cos(math.pi * s / max(args.steps, 1)))
    return args.lr * warm


def rng_state(sampler_rng, gen):
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "sampler": sampler_rng.getstate(), "generator": gen.get_state()}


def save_checkpoint(args, step, model, opt, sampler_rng, gen, task_stats):
    path = os.path.join(args.out, f"step_{step}")
    state = {"step": step, "optimizer": opt.state_dict(), "rng": rng_state(sampler_rng, gen), "args": vars(args),
             "task_stats": task_stats,
             "lora": {k: v for k, v in model.state_dict().items() if "lora_" in k} if args.lora_rank else None}
    save_pretrained(model, path, extra={"trainer_state.pt": lambda p: torch.save(state, p)})
    # the newest --keep, and the warm start's (step --sft-steps): GRPO seeds and ablations start from it (--init-from)
    ckpts = sorted((d for d in os.listdir(args.out) if d.startswith("step_") and not d.endswith(".tmp")
                    and not (d == f"step_{args.sft_steps}" and args.steps)), key=lambda d: int(d.split("_")[1]))
    for d in ckpts[: -args.keep]:
        shutil.rmtree(os.path.join(args.out, d), ignore_errors=True)
    return path


def load_init_from(args):
    """--init-from's trainer state, after checking it was trained the way this run continues it: a LoRA checkpoint's
    adapters only mean something on the base model they were trained on."""
    path = os.path.join(args.init_from, "trainer_state.pt")
    if not os.path.exists(path):
        sys.exit(f"error: --init-from {args.init_from}: no trainer_state.pt there (expected a run's step_N folder)")
    state = torch.load(path, weights_only=False)
    for key in ("model", "lora_rank", "lora_alpha", "lora_targets", "param_dtype"):
        if state["args"][key] != getattr(args, key):
            sys.exit(f"error: --init-from {args.init_from} was trained with --{key.replace('_', '-')} "
                     f"{state['args'][key]!r}, this run has {getattr(args, key)!r}")
    return state


def load_reference(args):
    """The KL reference (--kl-beta): the policy this run's GRPO phase started from, read from disk, so that a resumed run
    has the same one. That is the warm start's checkpoint OUT/step_<sft-steps> (always kept), else --init-from's, else
    the base model. With the warm start, the base would be the wrong anchor: it has not learned to call tools, and the
    penalty would pull the policy back to not calling them. LoRA: that checkpoint's adapter values (None: the base,
    adapters disabled); full fine-tuning: a frozen copy of its weights."""
    warm = os.path.join(args.out, f"step_{args.sft_steps}")
    path = warm if args.sft_steps and os.path.isdir(warm) else args.init_from
    if args.sft_steps and path is None:
        sys.exit(f"error: --kl-beta: the reference is the warm start's checkpoint {warm}, which does not exist "
                 f"(deleted?); restore it or give the checkpoint GRPO started from with --init-from")
    if args.lora_rank:
        if path is None:
            return None
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        return {k: v.to(args.device) for k, v in state["lora"].items()}
    ref = from_pretrained(path or args.model, dtype=getattr(torch, args.param_dtype), device=args.device)
    return ref.eval().requires_grad_(False)


def latest_checkpoint(out):
    if not os.path.isdir(out):
        return None
    steps = [int(d.split("_")[1]) for d in os.listdir(out) if d.startswith("step_") and d.split("_")[1].isdigit()
             and os.path.exists(os.path.join(out, d, "trainer_state.pt"))]
    return os.path.join(out, f"step_{max(steps)}") if steps else None


# -----------------------------------------------------------------------------
# Which tasks a GRPO step rolls out


def template_of(task):
    return task.get("template") or task["kind"]  # converted TAT-QA tasks have no template


def learnability(stats, keys):
    """stats {template: [passed episodes, episodes]} -> weight p (1 - p) per key, p the Beta(1, 1) posterior mean
    pass rate (an unseen template: p 0.5, the highest weight, so each is tried). A group of G episodes has signal
    with probability 1 - p^G - (1 - p)^G, which rises and falls with p (1 - p)."""
    out = []
    for k in keys:
        passed, n = stats.get(k, (0, 0))
        p = (passed + 1) / (n + 2)
        out.append(p * (1 - p))
    return out


def sample_tasks(train, k, args, rng, stats):
    if args.task_sampling == "uniform":
        return rng.sample(train, min(k, len(train)))
    by = {}
    for t in train:
        by.setdefault(template_of(t), []).append(t)
    tasks = []
    for _ in range(min(k, len(train))):  # a template by weight (with replacement), then one of its tasks not yet drawn
        keys = sorted(key for key, ts in by.items() if ts)
        key = rng.choices(keys, weights=learnability(stats, keys))[0]
        tasks.append(by[key].pop(rng.randrange(len(by[key]))))
    return tasks


# -----------------------------------------------------------------------------
# One update: micro-batched forward/backward over a batch of episodes with per-episode advantages


def episodes_for_update(eps, adv, keep, group_size, mask_truncated=False):
    """The (episode, advantage) pairs one update trains on: every episode of a group with signal (keep[i]), less the
    truncated ones under --mask-truncated (those still counted, with reward 0, in their group's mean and std)."""
    return [(eps[i * group_size + g], adv[i, g].item()) for i in range(len(keep)) if keep[i]
            for g in range(group_size) if not (mask_truncated and eps[i * group_size + g].truncated)]


def micro_batch_plan(episodes, args, sampled=True):
    """update()'s micro-batches, as lists of indices into episodes."""
    # A group's episodes together (the tokens they share, prompt and identical turns, run once), shortest first, and
    # a micro-batch never spans two groups: two groups share only the system prompt, one group often most of its
    # episodes (measured: ~1,300 of ~1,500 tokens without --sft-plan). Oracle episodes (one per task) form one run.
    order = sorted(range(len(episodes)), key=lambda i: (episodes[i].task["id"] if sampled else "", len(episodes[i].tokens)))
    runs = []
    for i in order:
        if runs and (not sampled or episodes[runs[-1][0]].task["id"] == episodes[i].task["id"]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return [[run[k] for k in mb] for run in runs
            for mb in micro_batches([episodes[i].tokens for i in run], args.micro_batch, args.split_micro_batches)]


def update(model, opt, episodes, adv, args, lr, reference=None, sampled=True):
    """One optimizer step (mu of them with --mu) on episodes with advantages adv. sampled: the episodes carry the
    engine's log-probs (rollouts); scripted ones (oracle) do not, and get IS weight 1 and no KL penalty.
    reference (--kl-beta; load_reference): LoRA adapter values, None for the base (adapters disabled), or a frozen model.
    On CUDA its attention avoids cuDNN's SDPA, which builds a graph for each new input shape, and an update's
    micro-batches (episode lengths) rarely repeat one. Measured on an H100 with a random 4B model, LoRA, micro-batch 2,
    32 new episodes of ~1,600 tokens: 20.3 s with cuDNN allowed, 16.2 s without (bench/RESULTS.md)."""
    if not args.device.startswith("cuda"):
        return _update(model, opt, episodes, adv, args, lr, reference, sampled)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return _update(model, opt, episodes, adv, args, lr, reference, sampled)


def _update(model, opt, episodes, adv, args, lr, reference, sampled):
    device = args.device
    for g in opt.param_groups:
        g["lr"] = lr
    mbs = micro_batch_plan(episodes, args, sampled)
    batches = []
    for mb in mbs:
        ids, mask, rlp = collate([episodes[i] for i in mb], device)
        batches.append((ids, mask, rlp, torch.tensor([adv[i] for i in mb], dtype=torch.float32, device=device)))
    n_tokens = sum(b[1].sum() for b in batches).clamp(min=1)

    # Rollouts: log-probs under the distribution they were sampled from (temperature, top-k/top-p). The warm start
    # clones the oracle at temperature 1, the model's own distribution: cloned at T, softmax(z / T) would fit the
    # oracle and rollouts at T would sample as broadly as ones at 1 from a model cloned at 1, losing the sharpening a
    # lower rollout temperature is for (measured: a rollout pass rate of 1.8% over 14 GRPO steps, against 4.9% from
    # a warm start cloned at 1; bench/RESULTS.md).
    temp, top_k, top_p = (args.temperature, args.top_k, args.top_p) if sampled else (1.0, 0, 1.0)
    # --loss-agg weighs rollouts against each other; cloning the oracle is the plain NLL over its tokens (token-mean)
    agg = args.loss_agg if sampled else "token-mean"

    def logprobs(m, ids, mask):
        return token_logprobs(m, ids, mask, temp, args.logprob_chunk, args.share_prefix, top_k=top_k, top_p=top_p)

    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast)
    # old log-probs: recomputed without grad for mu > 1; for mu = 1 the first forward's own values (rho = 1)
    olds = [None] * len(batches)
    if args.mu > 1:
        with torch.no_grad(), autocast, packs_bypassed(model):  # no-grad passes compute what the gradient pass does
            olds = [logprobs(model, ids, mask)[0] for ids, mask, _, _ in batches]
    refs = [None] * len(batches)
    if args.kl_beta > 0 and sampled:
        if isinstance(reference, torch.nn.Module):
            ref = contextlib.nullcontext(reference)
        else:
            ref = adapters_disabled(model) if reference is None else adapters_loaded(model, reference)
        with torch.no_grad(), autocast, packs_bypassed(model), ref as ref_model:
            refs = [logprobs(ref_model, ids, mask)[0] for ids, mask, _, _ in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    stats = {"clip_frac": 0.0, "kl": 0.0, "is_weight": 0.0, "tokens": 0.0, "entropy": 0.0, "loss": 0.0, "nll": 0.0,
             "mismatch_mean": 0.0, "mismatch_max": 0.0}
    for epoch in range(args.mu):
        opt.zero_grad(set_to_none=True)
        for k, (ids, mask, rlp, a) in enumerate(batches):
            with autocast:
                logp, ent = logprobs(model, ids, mask)
            old = logp.detach() if olds[k] is None else olds[k]
            rollout = rlp if sampled else old
            loss, s = policy_loss(logp, old, rollout, a, mask, args.clip_low, args.clip_high, args.is_cap,
                                  agg, n_tokens, len(episodes), args.norm_len, args.kl_beta, refs[k])
            loss.backward()
            if epoch == 0:
                for key in ("clip_frac", "kl", "is_weight", "tokens"):
                    stats[key] += s[key]
                stats["entropy"] += (ent * mask).sum().item()
                stats["nll"] -= (logp.detach() * mask).sum().item()
                stats["loss"] += loss.item()
                diff = (old - rollout).abs() * mask
                stats["mismatch_mean"] += diff.sum().item()
                stats["mismatch_max"] = max(stats["mismatch_max"], diff.max().item())
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        opt.step()
    t = max(stats["tokens"], 1)
    return {"loss": stats["loss"], "nll": stats["nll"] / t, "grad_norm": float(gnorm), "clip_frac": stats["clip_frac"] / t, "kl": stats["kl"] / t,
            "entropy": stats["entropy"] / t, "is_weight": stats["is_weight"] / t,
            "mismatch_mean": stats["mismatch_mean"] / t, "mismatch_max": stats["mismatch_max"], "train_tokens": int(t)}


# -----------------------------------------------------------------------------
# Logging


class Logger:
    """metrics.jsonl, a line per step on stdout, and wandb (offline by default; a no-op when off)."""

    def __init__(self, args, resume_step):
        self.path = os.path.join(args.out, "metrics.jsonl")
        self.transcripts = os.path.join(args.out, "transcripts.jsonl")  # rollout transcripts, a line per episode
        for path in (self.path, self.transcripts):
            if resume_step and os.path.exists(path):  # drop records past the checkpoint we resume from: they replay
                keep = [l for l in open(path) if json.loads(l).get("step", 0) <= resume_step]
                open(path, "w").writelines(keep)
        self.wandb = None
        if args.wandb != "off":
            try:
                import wandb
            except ImportError:
                sys.exit("error: --wandb offline/online needs the wandb package (pip install wandb) or use --wandb off")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project="tablerl", dir=args.out, mode=args.wandb, config=vars(args), resume="allow",
                                    id=open_or_make_id(args.out))

    def log(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb:
            self.wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=rec["step"])

    def close(self):
        if self.wandb:
            self.wandb.finish()


def open_or_make_id(out):
    p = os.path.join(out, "wandb_id")
    if not os.path.exists(p):
        with open(p, "w") as f:
            f.write(f"tablerl-{int(time.time())}-{random.randrange(10**6)}")
    return open(p).read().strip()


def fmt_time(s):
    return time.strftime("%H:%M:%S", time.gmtime(max(s, 0)))


def peak_memory_gb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rubric_means(episodes):
    return {f"rubric/{k}": v for k, v in rubric_rates([e.rubric for e in episodes]).items()}


@torch.no_grad()
def evaluate(rollout_model, tok, tasks, args, engine):
    """Greedy episodes on the val tasks, engine.B at a time (the rollouts' engine: on CUDA its step is compiled)."""
    eps = []
    for i in range(0, len(tasks), engine.B):
        eps += run_episodes(rollout_model, tok, tasks[i:i + engine.B], group_size=1, max_turns=args.max_turns,
                            max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens, temperature=0.0, engine=engine,
                            repeat_note=args.repeat_note)
    return {"val/pass@1_greedy": sum(e.reward for e in eps) / len(eps), **{f"val/{k}": v for k, v in rubric_means(eps).items()}}


# -----------------------------------------------------------------------------
# The loop


def spare_turns(task, max_turns):
    """Turns left in max_turns after the oracle's own (list, inspect each table, one query per cell, calculator,
    answer): a detour or a misread must fit in them, so no demonstration is longer than a rollout may be."""
    return max_turns - (3 + len(task["gold_tables"]) + len(task["gold_cells"]))


def pick_detour(task, rng, max_turns):
    """-> (a table that lacks the task's first gold cell, whether the detour also queries it), or None. The detour
    fits in spare_turns."""
    from eval import detour_query
    spare = spare_turns(task, max_turns)
    with SQLEnv(task["db_path"]) as env:
        tables = [t for t in env.tables if t not in task["gold_tables"]]
        rng.shuffle(tables)
        query = rng.random() < 0.5 and spare >= 2
        if spare < 1:
            return None
        for t in tables:  # the first one where the cell's query finds nothing, as it would in a wrong table
            out = env.sql_query(detour_query(task, t))
            if out.startswith(("(no rows)", "Error")):
                return t, query
    return None


def pick_misread(task, max_turns):
    """-> a near miss of the first gold cell's label (eval.near_miss_labels) that finds no rows in its table and gets
    a note offering the real label in that table (as the closest label, or among the row labels it lists), or None
    (no such miss, or no spare turn for the extra query). A miss the note answers with another table ('Found in ...')
    is left out: that is the table detour's lesson."""
    from eval import cell_query, near_miss_labels
    c = task["gold_cells"][0]
    if spare_turns(task, max_turns) < 1:
        return None
    with SQLEnv(task["db_path"]) as env:
        for label in near_miss_labels(c["item"]):
            out = env.sql_query(cell_query({**c, "item": label, "row_idx": None}))
            if out.startswith("(no rows)") and [None, c["item"]] in env.log[-1].offered:
                return label
    return None


def oracle_episodes(tok, tasks, cache, rng=None, detour_p=0.0, max_turns=8, plan=False, misread_p=0.0, quote=False):
    """The oracle's episodes as token streams. With probability misread_p one first asks for its first cell by a
    near-miss label and corrects it from the empty result's note (pick_misread; the model's plans name labels from
    memory and then repeat the query that finds nothing). Otherwise, with probability detour_p, one first opens a
    wrong table (and half of those also query it) before the right one: the warm-started model picked a wrong table
    in most of its failures and then answered from it. The wrong turns are masked: they show how to notice and
    recover, and only the recovery is cloned. A probability of 0 draws nothing from rng. quote: the plan's labels as
    SQL literals (eval.plan_text)."""
    from eval import oracle_episode
    out = []
    for t in tasks:
        misread = pick_misread(t, max_turns) if misread_p > 0 and rng.random() < misread_p else None
        detour = pick_detour(t, rng, max_turns) if not misread and detour_p > 0 and rng.random() < detour_p else None
        key = (t["id"], detour, plan, misread, quote)
        if key not in cache:
            with SQLEnv(t["db_path"]) as env:
                msgs, _, failure = oracle_episode(t, env, detour, plan, misread, quote)
            if failure:
                raise RuntimeError(f"oracle failed on training task {t['id']}: {failure}")
            cache[key] = episode_from_messages(tok, t, msgs)
        out.append(cache[key])
    return out


def warm_start_batch(tok, train, cache, rng, args):
    """--sft-batch oracle episodes of training tasks drawn with rng, as the --sft-* flags shape them."""
    demos = [t for t in train if "expr" in t]  # converted data may lack a derivation for some tasks
    tasks = rng.sample(demos, min(args.sft_batch, len(demos)))
    return oracle_episodes(tok, tasks, cache, rng, args.sft_detours, args.max_turns, args.sft_plan, args.sft_misreads,
                           args.sft_quote_labels)


def main(argv=None):
    args = get_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    for path in args.tasks:
        if path == "data/generated/synth/tasks.jsonl" and not os.path.exists(path):
            from data.synth import ensure_synth
            print("building the synthetic task set (python -m data.synth) ...", flush=True)
            ensure_synth(os.path.dirname(path))
    train, val = select_tasks(load_task_files(args.tasks), args)

    ckpt = latest_checkpoint(args.out) if args.resume else None
    if args.resume and not ckpt:
        print(f"--resume: no checkpoint in {args.out}; starting {'from ' + args.init_from if args.init_from else 'fresh'}",
              flush=True)
    reseed = not ckpt and args.init_from is not None  # --init-from: the checkpoint's state, this run's randomness
    if reseed:  # read once, here: checked before the model is built, and a full fine-tuning optimizer state is large
        ckpt, state = args.init_from, load_init_from(args)
        if state["args"].get("seed") == args.seed:
            # the draws come from fresh generators seeded by --seed: a run from step 40 with the seed of the run that
            # wrote step 40 draws again what that run drew at steps 1, 2, ... (the same tasks, detours and samples)
            print(f"--init-from {ckpt}: that run had --seed {args.seed} too, so this run's task draws start over as "
                  f"its did at its first step (a replay of its first batches); pass another --seed for new ones",
                  flush=True)
    elif ckpt:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
        # a run resumes exactly under the flags it ran with: a flag changed since, or a default a newer tablerl
        # changed, is named here, not applied silently
        ran = state["args"]
        if isinstance(ran.get("tasks"), str):  # saved before --tasks took several files
            ran = {**ran, "tasks": [ran["tasks"]]}
        mine = {k: v for k, v in vars(args).items() if k not in ("resume", "stop_at", "wandb", "threads")}
        changed = [f"--{k.replace('_', '-')} {ran[k]!r} -> {v!r}" for k, v in mine.items() if k in ran and ran[k] != v]
        # a flag newer than the run: it ran without it, so a default other than the old behavior changes the run
        changed += [f"--{k.replace('_', '-')} (new since that run) {v!r}" for k, v in mine.items() if k not in ran]
        if changed:
            print(f"--resume: these flags differ from the run's, and the new values apply: {', '.join(changed)}",
                  flush=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, rollout_model = build_model(args, ckpt)
    tok = load_tokenizer(args.model)
    # --kl-beta: loaded at the first GRPO update (a fresh run's warm start is on disk by then)
    reference, ref_loaded = None, False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, args)
    sampler_rng = random.Random(args.seed)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    start, task_stats = 0, {}  # task_stats {template: [passed episodes, episodes]} over the run's rollouts
    if ckpt:
        if args.lora_rank:
            model.load_state_dict(state["lora"], strict=False)
        sync_rollout_model(model, rollout_model)
        opt.load_state_dict(state["optimizer"])
        if not reseed:
            r = state["rng"]
            random.setstate(r["python"])
            np.random.set_state(r["numpy"])
            torch.set_rng_state(r["torch"])
            sampler_rng.setstate(r["sampler"])
            gen.set_state(r["generator"])
        start, task_stats = state["step"], state.get("task_stats", {})
        print(f"{'started' if reseed else 'resumed'} from {ckpt} at step {start}"
              + (f" with --seed {args.seed}" if reseed else ""), flush=True)
    logger = Logger(args, start)
    total = args.sft_steps + args.steps
    n_params = sum(p.numel() for p in params)
    print(f"tablerl GRPO | {args.model} | {'LoRA r=%d' % args.lora_rank if args.lora_rank else 'full fine-tuning'} "
          f"({n_params / 1e6:.1f}M trainable) | {len(train)} train tasks, {len(val)} val | {args.sft_steps} warm-start "
          f"+ {args.steps} GRPO steps | out {args.out}", flush=True)
    print(f"  {args.device}: weights {args.param_dtype}, rollouts {args.rollout_dtype}, bf16 autocast "
          f"{'on' if args.autocast else 'off'}, grad-ckpt {'on' if args.grad_ckpt else 'off'}"
          + ("" if args.autocast or not args.device.startswith("cpu") else " (bf16 does not pay on this CPU: model.bf16_fast)"),
          flush=True)
    # the reward's shaping terms, so a log says which reward it ran
    print("  reward: 1 for the right number, else 0" + "".join(
        f", --{k.replace('_', '-')} {getattr(args, k):g}" for k in REWARD_TERMS if getattr(args, k)), flush=True)
    engine = Engine(rollout_model, args.tasks_per_step * args.group_size, args.max_tokens + 1)  # reused every step
    oracle_cache, t_start, last = {}, time.time(), start
    # [seconds, steps] per phase this session: a GRPO step (rollouts, update) takes 2-3x a warm-start step, so the
    # ETA is the current phase's own mean times its steps left
    spent = {"sft": [0.0, 0], "grpo": [0.0, 0]}
    end = total if args.stop_at is None else max(start, min(total, args.stop_at))  # --stop-at 0: nothing to run
    for step in range(start, end):
        t0, last = time.time(), step + 1
        lr = lr_at(step, args)
        phase = "sft" if step < args.sft_steps else "grpo"
        rec = {"step": step + 1, "phase": phase, "lr": lr}
        if phase == "sft":
            batch = warm_start_batch(tok, train, oracle_cache, sampler_rng, args)
            t1 = time.time()
            rec.update(update(model, opt, batch, [1.0] * len(batch), args, lr, sampled=False))
            rec["update_s"] = time.time() - t1
        else:
            tasks = sample_tasks(train, args.tasks_per_step, args, sampler_rng, task_stats)
            t1 = time.time()
            model.eval()
            eps = run_episodes(rollout_model, tok, tasks, args.group_size, args.max_turns, args.max_tokens,
                               args.max_new_tokens, args.temperature, args.top_k, args.top_p, gen, engine,
                               args.repeat_note)
            rec["rollout_s"] = time.time() - t1
            rewards, adv, keep = grade_groups(eps, args)
            passed = torch.tensor([e.reward > 0 for e in eps]).view(len(tasks), args.group_size)
            for t, row in zip(tasks, passed):
                st = task_stats.setdefault(template_of(t), [0, 0])
                st[0], st[1] = st[0] + int(row.sum()), st[1] + len(row)
            rec["templates"] = " ".join(template_of(t) for t in tasks)
            rec.update({"reward": rewards.mean().item(), "pass_rate": passed.float().mean().item(),
                        "zero_var_frac": 1 - keep.float().mean().item(), "adv_abs_mean": adv.abs().mean().item(),
                        "adv_std": adv.std().item(), "truncated_frac": sum(e.truncated for e in eps) / len(eps),
                        "response_tokens": sum(sum(e.mask) for e in eps) / len(eps),
                        "episode_tokens": sum(len(e.tokens) for e in eps) / len(eps),
                        "turns": sum(e.turns for e in eps) / len(eps), **rubric_means(eps)})
            rec["rollout_tok_s"] = sum(sum(e.mask) for e in eps) / rec["rollout_s"]
            chosen = episodes_for_update(eps, adv, keep, args.group_size, args.mask_truncated)
            if chosen:
                t1 = time.time()
                model.train()
                if args.kl_beta > 0 and not ref_loaded:
                    reference, ref_loaded = load_reference(args), True
                rec.update(update(model, opt, [e for e, _ in chosen], [a for _, a in chosen], args, lr, reference))
                rec["update_s"] = time.time() - t1
                rec["train_tok_s"] = sum(len(e.tokens) for e, _ in chosen) / rec["update_s"]
            with open(logger.transcripts, "a") as f:
                for e in eps[: args.group_size]:
                    f.write(json.dumps({"step": step + 1, "reward": e.reward, "finish": e.finish, "text": e.transcript()}) + "\n")
        sync_rollout_model(model, rollout_model)
        phase_end = step + 1 in (args.sft_steps, total)
        if val and (phase_end or (phase == "grpo" and (step + 1 - args.sft_steps) % args.eval_every == 0)):
            model.eval()
            rec.update(evaluate(rollout_model, tok, val, args, engine))
        rec["step_s"] = time.time() - t0
        rec["peak_mem_gb"] = peak_memory_gb(args.device)
        spent[phase][0] += rec["step_s"]
        spent[phase][1] += 1
        left = (args.sft_steps if phase == "sft" else total) - step - 1  # steps left in this phase
        eta = f"ETA {fmt_time(spent[phase][0] / spent[phase][1] * left)}"
        if phase == "sft" and total > args.sft_steps:
            eta += f" (warm start; {total - args.sft_steps} GRPO steps after)"
        line = f"step {step + 1}/{total} [{phase}] "
        if phase == "grpo":
            line += f"reward {rec['reward']:.2f} pass {rec['pass_rate']:.2f} zero-var {rec['zero_var_frac']:.2f} "
        line += " ".join(f"{k} {rec[k]:.3g}" for k in ("loss", "nll", "grad_norm", "entropy", "clip_frac") if k in rec)
        if "val/pass@1_greedy" in rec:
            line += f" | val pass@1 {rec['val/pass@1_greedy']:.2f}"
        print(line + f" | {rec['step_s']:.1f}s/step {eta}", flush=True)
        logger.log(rec)
        stop = args.stop_at is not None and step + 1 >= args.stop_at
        if (step + 1) % args.save_every == 0 or step + 1 in (total, args.sft_steps) or stop:
            save_checkpoint(args, step + 1, model, opt, sampler_rng, gen, task_stats)
        if stop:
            print(f"stopped at step {step + 1} (--stop-at); continue with --resume", flush=True)
            break
    logger.close()
    if last == start:
        print(f"nothing to do: {args.out} is at step {start} of {total}")
    else:
        print(f"done: steps {start + 1}-{last} of {total} in {fmt_time(time.time() - t_start)}; checkpoint "
              f"{os.path.join(args.out, f'step_{last}')}")
        if last == total and len(args.tasks) == 1:  # the held-out evaluation (the validation is --eval-tasks val tasks)
            # where GRPO started: this run's warm-start checkpoint, else the one it was started from (--init-from)
            starts = [os.path.join(args.out, f"step_{args.sft_steps}")] if 0 < args.sft_steps < total else []
            before = [p for p in starts + [args.init_from] if p and os.path.isdir(p)][:1] + [args.model]
            print(f"test it: python eval.py --ckpt {os.path.join(args.out, f'step_{total}')} --compare "
                  f"{' '.join(before)} --tasks {args.tasks[0]} --kind {args.train_kind} --samples 0 "
                  f"--batch-tasks 16  (greedy, every test task of the kind trained on; ~30 minutes a checkpoint on a "
                  f"2-core CPU; bench/RESULTS.md)")


if __name__ == "__main__":
    main()
