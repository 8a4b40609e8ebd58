"""GRPO math against hand-computed cases, the rollout's token stream against the chat template, and the trainer."""
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil

import pytest
import torch

from env_sql import SQLEnv, load_tasks
from eval import detour_query, near_miss_labels, oracle_episode, pass_at_k
from model import Tokenizer, from_pretrained, load_tokenizer
from rollout import (Episode, common_prefix_len, episode_from_messages, prompt_ids, render_episode_text,
                     run_episodes)
from train_grpo import (collate, episode_rewards, episodes_for_update, get_args, group_advantages, k3_kl, main, micro_batches,
                        oracle_episodes, pick_detour, pick_misread, policy_loss, shared_prefix_len, token_logprobs, update)


# --- advantages ------------------------------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    adv, keep = group_advantages(r, scale_std=True, eps=0.0)
    s = 1 / math.sqrt(1 / 3)  # row 0: mean 0.5, sample std sqrt(1/3)
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) * s)
    assert torch.allclose(adv[2], torch.tensor([-0.5, -0.5, -0.5, 1.5]))  # mean 0.25, sample std 0.5
    assert keep.tolist() == [True, False, True]
    adv, _ = group_advantages(r, scale_std=False)
    assert torch.allclose(adv[2], torch.tensor([-0.25, -0.25, -0.25, 0.75])) and torch.equal(adv[1], torch.zeros(4))


def graded(reward, finish="answer", **rubric):
    """A graded episode with no tokens: all the reward shaping reads is its reward, finish and rubric flags."""
    return Episode({}, [], [], [], 0, finish=finish, reward=reward, rubric=rubric)


def test_table_reward_hand_computed():
    ep = lambda reward, first_right, finish="answer": graded(reward, finish, first_table_right=first_right)
    eps = [ep(1.0, True), ep(1.0, False), ep(0.0, True), ep(0.0, False), ep(0.0, True, finish="turn_limit")]
    assert episode_rewards(eps).tolist() == [1, 1, 0, 0, 0]  # the default: the answer alone
    assert episode_rewards(eps, 0.25).tolist() == [1, 1, 0.25, 0, 0]  # a cut episode earns nothing
    # a group with one right first table and no correct answer now has signal
    adv, keep = group_advantages(episode_rewards([ep(0.0, True), ep(0.0, False)], 0.25).view(1, 2), False)
    assert keep.item() and adv.tolist() == [[0.125, -0.125]]


def test_repeat_penalty_hand_computed():
    ep = lambda reward, repeated, finish="answer": graded(reward, finish, repeated_call=repeated)
    eps = [ep(1.0, False), ep(1.0, True), ep(0.0, False), ep(0.0, True), ep(0.0, True, finish="turn_limit")]
    assert episode_rewards(eps).tolist() == [1, 1, 0, 0, 0]  # off by default
    assert episode_rewards(eps, repeat_penalty=0.25).tolist() == [1, 0.75, 0, -0.25, -0.25]
    # a group that loops in one episode and fails plainly in the other now has signal, against the loop
    adv, keep = group_advantages(episode_rewards([ep(0.0, False), ep(0.0, True, "turn_limit")], 0, 0.5).view(1, 2), False)
    assert keep.item() and adv.tolist() == [[0.25, -0.25]]


def test_giveup_penalty_hand_computed():
    ep = lambda reward, gave_up, finish="answer": graded(reward, finish, gave_up_after_empty=gave_up)
    # graded(0.0): an episode with no empty result, so no gave_up_after_empty flag
    eps = [ep(1.0, True), ep(0.0, True), ep(0.0, False), graded(0.0), ep(0.0, True, "turn_limit")]
    assert episode_rewards(eps).tolist() == [1, 0, 0, 0, 0]  # off by default
    # a correct answer is never charged; a wrong or cut one that stopped looking is
    assert episode_rewards(eps, giveup_penalty=0.25).tolist() == [1, -0.25, 0, 0, -0.25]
    assert episode_rewards([ep(0.0, True)], 0.5, 0.0, 0.25).tolist() == [-0.25]  # no table reward without the flag
    # a group of failures where one episode looked on after "(no rows)" now has signal, for looking on
    adv, keep = group_advantages(episode_rewards([ep(0.0, False), ep(0.0, True)], giveup_penalty=0.5).view(1, 2), False)
    assert keep.item() and adv.tolist() == [[0.25, -0.25]]


def test_ungrounded_penalty_hand_computed():
    ep = lambda reward, answered, ungrounded, finish="answer": graded(reward, finish, answered=answered,
                                                                      ungrounded_answer=ungrounded)
    # correct; wrong but read; wrong and invented; no answer (the turn limit); correct but not matched to a read value
    eps = [ep(1.0, True, False), ep(0.0, True, False), ep(0.0, True, True), ep(0.0, False, False, "turn_limit"),
           ep(1.0, True, True)]
    assert episode_rewards(eps).tolist() == [1, 0, 0, 0, 1]  # off by default
    # every way of ending without a read number is charged the same; a correct answer never is
    assert episode_rewards(eps, ungrounded_penalty=0.25).tolist() == [1, 0, -0.25, -0.25, 1]
    # a group of wrong answers where one copied a number it read now has signal, for reading
    adv, keep = group_advantages(episode_rewards(eps[1:3], ungrounded_penalty=0.5).view(1, 2), False)
    assert keep.item() and adv.tolist() == [[0.25, -0.25]]


def test_guess_penalty_hand_computed():
    ep = lambda reward, answered, ungrounded, finish="answer": graded(reward, finish, answered=answered,
                                                                      ungrounded_answer=ungrounded)
    # correct; wrong but read; wrong and invented; no answer (the turn limit); correct but not matched to a read value
    eps = [ep(1.0, True, False), ep(0.0, True, False), ep(0.0, True, True), ep(0.0, False, False, "turn_limit"),
           ep(1.0, True, True)]
    assert episode_rewards(eps).tolist() == [1, 0, 0, 0, 1]  # the function's default: the answer alone
    # only the invented answer is charged: running out of turns keeps 0, a correct answer is never charged
    assert episode_rewards(eps, guess_penalty=0.5).tolist() == [1, 0, -0.5, 0, 1]
    # a group that failed twice, once by the turn limit and once by inventing a number, now has signal, against the
    # invention; under the answer alone it had none
    assert not group_advantages(episode_rewards(eps[2:4]).view(1, 2), False)[1].item()
    adv, keep = group_advantages(episode_rewards(eps[2:4], guess_penalty=0.5).view(1, 2), False)
    assert keep.item() and adv.tolist() == [[-0.25, 0.25]]


def test_reward_flags_reach_the_advantages():
    """Trap 8 for the reward and advantage flags: each one, given on the command line, changes a step's rewards or
    advantages as computed by hand. Two groups of 2: one correct answer and one wrong first-table loop that gave up
    and repeated a call (the correct one repeated one too); two wrong answers, one read from the data and one invented."""
    from train_grpo import grade_groups
    eps = [graded(1.0, first_table_right=True, answered=True, repeated_call=True),
           graded(0.0, "turn_limit", first_table_right=True, repeated_call=True, gave_up_after_empty=True),
           graded(0.0, first_table_right=True, answered=True),
           graded(0.0, answered=True, ungrounded_answer=True)]
    run = lambda *flags: grade_groups(eps, get_args(["--group-size", "2", "--guess-penalty", "0", *flags]))
    # the default reward charges the invented answer 0.5 (--guess-penalty), so the second group has signal
    rewards, adv, keep = grade_groups(eps, get_args(["--group-size", "2"]))
    assert rewards.tolist() == [[1, 0], [0, -0.5]] and keep.tolist() == [True, True]
    s = 1 / (math.sqrt(0.125) + 1e-6)  # group 2: mean -0.25, sample std sqrt(0.125)
    assert adv[1].tolist() == pytest.approx([0.25 * s, -0.25 * s])
    rewards, adv, keep = run()  # the answer alone
    assert rewards.tolist() == [[1, 0], [0, 0]] and keep.tolist() == [True, False]
    s = 1 / (math.sqrt(0.5) + 1e-6)  # the default: scaled by the sample std plus --adv-eps 1e-6
    assert adv.flatten().tolist() == pytest.approx([0.5 * s, -0.5 * s, 0, 0])
    assert run("--no-scale-std")[1].tolist() == [[0.5, -0.5], [0, 0]]
    s = 1 / (math.sqrt(0.5) + 0.5)
    assert run("--adv-eps", "0.5")[1].flatten().tolist() == pytest.approx([0.5 * s, -0.5 * s, 0, 0])
    assert run("--table-reward", "0.5")[0].tolist() == [[1, 0], [0.5, 0]]  # the cut episode earns nothing
    assert run("--repeat-penalty", "0.25")[0].tolist() == [[0.75, -0.25], [0, 0]]  # charged whatever the answer
    assert run("--giveup-penalty", "0.25")[0].tolist() == [[1, -0.25], [0, 0]]  # a correct answer never is
    assert run("--ungrounded-penalty", "0.25")[0].tolist() == [[1, -0.25], [0, -0.25]]  # no answer counts as unread
    assert run("--guess-penalty", "0.25")[0].tolist() == [[1, 0], [0, -0.25]]  # only the invented answer


# --- the policy loss -------------------------------------------------------------------------------------------------

def lp(*p):
    return torch.log(torch.tensor([p], dtype=torch.float32))


def test_clipping_both_sides():
    old = torch.zeros(1, 4)
    new = lp(1.5, 0.5, 0.5, 1.5)  # ratios
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 4)
    # A > 0: ratio 1.5 clips to 1.28 -> -1.28; ratio 0.5 stays -> -0.5
    loss, st = policy_loss(new, old, old, adv, mask, 0.2, 0.28, is_cap=0)
    assert loss.item() == pytest.approx((-1.28 - 0.5 - 0.5 - 1.28) / 4)
    assert st["clip_frac"] == 2
    # A < 0: ratio 0.5 clips to 0.8 -> 0.8; ratio 1.5 stays (the pessimistic side) -> 1.5
    loss, st = policy_loss(new, old, old, -adv, mask, 0.2, 0.28, is_cap=0)
    assert loss.item() == pytest.approx((1.5 + 0.8 + 0.8 + 1.5) / 4)
    assert st["clip_frac"] == 2
    # the clipped side carries no gradient
    new = new.clone().requires_grad_()
    policy_loss(new, old, old, adv, mask, 0.2, 0.28, is_cap=0)[0].backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == pytest.approx(-0.5 / 4)


def test_aggregation_modes():
    logp = torch.zeros(2, 3)
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])  # per-token losses: -1 for row 0, +2 for row 1
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    tok = policy_loss(logp, old, old, adv, mask, agg="token-mean", is_cap=0)[0]
    assert tok.item() == pytest.approx((-1 - 1 + 2) / 3)
    seq = policy_loss(logp, old, old, adv, mask, agg="seq-mean-token-mean", is_cap=0)[0]
    assert seq.item() == pytest.approx((-1 + 2) / 2)
    norm = policy_loss(logp, old, old, adv, mask, agg="seq-mean-token-sum-norm", norm_len=10, is_cap=0)[0]
    assert norm.item() == pytest.approx((-2 + 2) / (2 * 10))
    # micro-batches with the batch's counts add up to the whole batch's loss
    a = policy_loss(logp[:1], old[:1], old[:1], adv[:1], mask[:1], agg="token-mean", n_tokens=3, is_cap=0)[0]
    b = policy_loss(logp[1:], old[1:], old[1:], adv[1:], mask[1:], agg="token-mean", n_tokens=3, is_cap=0)[0]
    assert (a + b).item() == pytest.approx(tok.item())
    with pytest.raises(ValueError, match="--loss-agg"):
        policy_loss(logp, old, old, adv, mask, agg="sum")


def test_truncated_importance_weight():
    old = torch.zeros(1, 2)
    rollout = lp(1 / 3, 2.0)  # exp(old - rollout) = 3 and 0.5
    loss, st = policy_loss(torch.zeros(1, 2), old, rollout, torch.tensor([1.0]), torch.ones(1, 2), is_cap=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)  # 3 is capped at 2
    assert st["is_weight"] == pytest.approx(2.5)


def test_k3_kl():
    d = math.log(2.0)  # ref - logp
    assert k3_kl(torch.tensor(0.0), torch.tensor(d)).item() == pytest.approx(2 - d - 1)
    assert k3_kl(torch.tensor(0.3), torch.tensor(0.3)).item() == 0.0
    logp, ref = torch.zeros(1, 1), torch.tensor([[d]])
    loss, _ = policy_loss(logp, logp, logp, torch.tensor([0.0]), torch.ones(1, 1), kl_beta=0.5, ref_logp=ref, is_cap=0)
    assert loss.item() == pytest.approx(0.5 * (2 - d - 1))
    # unbiased: its mean over tokens drawn from pi, taken exactly as a pi-weighted sum over the vocabulary, is
    # KL(pi || ref) as torch.distributions computes it, while no token reaches the clamp at 10; far apart (ref puts
    # >= e^2.6 times pi's mass on some token) the clamp biases it low, never high
    g = torch.Generator().manual_seed(0)
    for scale in (0.05, 0.2, 0.5, 2.0):
        # float64: for close distributions exp(d) - d - 1 cancels to a few digits in float32
        pi = torch.distributions.Categorical(logits=torch.randn(6, 50, generator=g, dtype=torch.float64) * scale)
        ref = torch.distributions.Categorical(logits=torch.randn(6, 50, generator=g, dtype=torch.float64) * scale)
        k3 = k3_kl(pi.logits, ref.logits)
        mean, kl = (pi.probs * k3).sum(-1), torch.distributions.kl_divergence(pi, ref)
        if scale < 1:
            assert k3.max() < 10 and torch.allclose(mean, kl, rtol=1e-9, atol=0), scale
        else:
            assert k3.max() == 10 and (mean < kl).all(), scale


def test_pass_at_k():
    assert pass_at_k(4, 0, 1) == 0 and pass_at_k(4, 4, 2) == 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    # by definition: of all k-subsets of the n samples (the first c correct), the fraction holding a correct one
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(min(s) < c for s in subsets) / len(subsets)), (n, c, k)


# --- token streams ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_tasks(tmp_path_factory):
    from data.synth import build
    out = str(tmp_path_factory.mktemp("synth_grpo"))
    build(out, seed=5, companies=6)
    return load_tasks(os.path.join(out, "tasks.jsonl"))


def oracle_messages(task, plan=False):
    with SQLEnv(task["db_path"]) as env:
        return oracle_episode(task, env, plan=plan)[0]


@pytest.mark.parametrize("kind,plan", [("multi_table", False), ("multi_table", True), ("lookup", True),
                                       ("multi_table", "late")])
def test_loss_mask_equals_assistant_spans_of_apply_chat_template(qwen3_tokenizer_dir, synth_tasks, kind, plan):
    """plan: the oracle's text before a tool call renders as the template renders content with tool_calls, and is
    trained on; a planned lookup ends without the calculator. A late plan goes with the first query."""
    from transformers import AutoTokenizer
    from env_sql import TOOLS, task_messages
    ref = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    tok = Tokenizer(qwen3_tokenizer_dir, fmt="qwen3-instruct")
    task = next(t for t in synth_tasks if kind in (t["kind"], t["template"]))
    msgs = oracle_messages(task, plan)
    assert bool(msgs[0]["content"]) == (plan is True) and bool(msgs[2]["content"]) == bool(plan)  # plan, description
    first_query = next(m for m in msgs if m.get("tool_calls") and m["tool_calls"][0]["name"] == "sql_query")
    assert first_query["content"].startswith("Plan: ") == (plan == "late")
    ep = episode_from_messages(tok, task, msgs)
    assert ep.reward == 1.0
    conv = task_messages(task) + msgs
    # everything before the final answer, as the template renders it (with the generation prompt) ...
    want = list(ref.apply_chat_template(conv[:-1], tools=TOOLS, add_generation_prompt=True, tokenize=True)["input_ids"])
    final = tok.encode(conv[-1]["content"]) + [tok.im_end]
    assert ep.tokens == want + final
    # ... and the assistant spans, found in the template's own ids: after "<|im_start|>assistant\n" through <|im_end|>
    start = ref.encode("<|im_start|>assistant\n", add_special_tokens=False)
    spans = [0] * len(ep.tokens)
    i = 0
    while i < len(ep.tokens):
        if ep.tokens[i:i + len(start)] == start:
            j = i + len(start)
            while j < len(ep.tokens) and ep.tokens[j] != tok.im_end:
                j += 1
            if j < len(ep.tokens) or i + len(start) < len(want):
                for k in range(i + len(start), min(j + 1, len(ep.tokens))):
                    spans[k] = 1
            i = j
        i += 1
    assert ep.mask == spans and sum(ep.mask) > 0


def test_late_plan_names_only_row_labels_already_printed(synth_tasks):
    """--sft-plan late: the plan comes with the first query, and each row label it names was printed by an earlier
    tool output (the inspected tables' "Row labels" line), so a model that clones it copies labels from the screen.
    The early plan names labels before any tool output, which is the behavior the late plan removes."""
    import re
    from env_sql import grade_task
    from eval import plan_text
    for t in synth_tasks:
        for plan in ("early", "late"):
            with SQLEnv(t["db_path"]) as env:
                msgs, answer, failure = oracle_episode(t, env, plan=plan)
            assert not failure and grade_task(t, answer) == 1.0, t["id"]
            said = [(i, m["content"]) for i, m in enumerate(msgs) if m["content"].startswith("Plan: ")]
            assert [s for _, s in said] == [plan_text(t)]
            i = said[0][0]
            assert (i == 0) == (plan == "early")
            shown = "\n".join(m["content"] for m in msgs[:i] if m["role"] == "tool")
            cells = re.fullmatch(r"Plan: (.*); answer = (.*)", said[0][1]).group(1)
            labels = [item for _, item, _ in re.findall(r"(\w) = (.+?) \((\w+)\)(?:, |$)", cells)]
            assert len(labels) == len(t["gold_cells"])
            for label in labels:
                printed = any(label in re.split(r"; | / ", line.split(": ", 1)[1])
                              for line in shown.splitlines() if line.startswith("Row labels"))
                assert printed == (plan == "late"), (t["id"], plan, label)


@pytest.mark.parametrize("quote", [False, True])
def test_oracle_plan_names_the_cells_sqlite_holds_and_the_gold_formula(synth_tasks, quote):
    """Every planned oracle episode is graded right, and its words are checked against SQLite and the gold answer:
    each "x = item (column)" of the plan read from the task's gold tables with sqlite3, then the plan's expression
    in those letters evaluated in Python, gives the task's answer; each "description -> table" is that table's
    description in _catalog; a lookup makes no calculator call. quote: each label is the SQL literal ("x = 'item'
    (column)"), and SQLite reads the cell with that literal pasted into the query as written."""
    import re
    import sqlite3
    from env_sql import grade_task
    from eval import plan_text
    for t in synth_tasks:
        with SQLEnv(t["db_path"]) as env:
            msgs, answer, failure = oracle_episode(t, env, plan=True, quote=quote)
            calls = [c.name for c in env.log]
        assert not failure and grade_task(t, answer) == 1.0, t["id"]
        assert ("calculator" in calls) == (t["expr"] != "{0}")
        plan = msgs[0]["content"]
        assert plan == plan_text(t, quote)
        cells, expr = re.fullmatch(r"Plan: (.*); answer = (.*)", plan).groups()
        env_vars = {}
        label = r"'(?:[^']|'')*'" if quote else r".+?"
        with sqlite3.connect(t["db_path"]) as con:
            for name, item, col in re.findall(rf"(\w) = ({label}) \((\w+)\)(?:, |$)", cells):
                where = f"item = {item}" if quote else "item = ?"
                found = [r[0] for g in t["gold_tables"] if col in [c[1] for c in con.execute(f'PRAGMA table_info("{g}")')]
                         for r in con.execute(f'SELECT "{col}" FROM "{g}" WHERE {where}', () if quote else (item,))]
                assert len(found) == 1, (t["id"], item, col)
                env_vars[name] = found[0]
            assert len(env_vars) == len(t["gold_cells"])
            assert round(eval(expr, {"__builtins__": {}}, env_vars), 2) == t["answer"], t["id"]
            if quote:  # each query by label holds the plan's literal as written: the copy ends at the quote
                queries = [m["tool_calls"][0]["arguments"]["query"] for m in msgs
                           if m.get("tool_calls") and m["tool_calls"][0]["name"] == "sql_query"]
                for q in queries:
                    lit = re.search(r"item = ('(?:[^']|'')*')", q)
                    assert lit is None or f"= {lit.group(1)} (" in plan, (t["id"], q)
            for m in msgs:
                if m.get("tool_calls") and m["tool_calls"][0]["name"] == "get_table_info":
                    table = m["tool_calls"][0]["arguments"]["table_name"]
                    desc = con.execute("SELECT description FROM _catalog WHERE table_name = ? AND column_name = ''",
                                       (table,)).fetchone()[0]
                    assert m["content"] == f"{desc} -> {table}"


def test_oracle_detour_shows_recovery_without_cloning_the_mistake(default_model, synth_tasks):
    import sqlite3
    _, tok = default_model
    rng = random.Random(0)
    kinds = set()
    for t in [t for t in synth_tasks if t["kind"] == "single_table"][:40]:
        d = pick_detour(t, rng, max_turns=8)
        assert d is not None
        table, query = d
        kinds.add((t["template"] == "average", query))
        # SQLite itself: the wrong table has no row of the first gold cell's label in that column
        c = t["gold_cells"][0]
        with sqlite3.connect(t["db_path"]) as con:
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]
            assert table not in t["gold_tables"] and (c["column"] not in cols or con.execute(
                f'SELECT COUNT(*) FROM "{table}" WHERE item = ?', (c["item"],)).fetchone()[0] == 0)
        with SQLEnv(t["db_path"]) as env:
            msgs = oracle_episode(t, env, d)[0]
        ep = episode_from_messages(tok, t, msgs)
        assert ep.reward == 1.0 and ep.turns <= 8 and ep.turns == len(oracle_messages(t)) // 2 + 1 + 1 + query
        # what is cloned is exactly the straight oracle's tokens; the detour's calls are context only
        straight = episode_from_messages(tok, t, oracle_messages(t))
        assert [x for x, m in zip(ep.tokens, ep.mask) if m] == [x for x, m in zip(straight.tokens, straight.mask) if m]
        context = tok.decode([x for x, m in zip(ep.tokens, ep.mask) if not m])
        assert f'"table_name": "{table}"' in context and (json.dumps(detour_query(t, table)) in context) == query
    # both kinds of detour occur; the 3-cell template (8 turns already with a detour) never gets the query
    assert kinds == {(False, True), (False, False), (True, False)}
    # --sft-detours 0 draws nothing, so runs without detours replay the earlier ones' task draws
    state = rng.getstate()
    oracle_episodes(tok, synth_tasks[:3], {}, rng, 0.0)
    assert rng.getstate() == state


def test_warm_start_flags_shape_the_batch(synth_tasks):
    """Trap 8 for the warm start's flags, read where the loop reads them: --sft-batch episodes, the plan said or not,
    its labels quoted, a detour or a misread in every episode at probability 1."""
    from eval import plan_text
    from train_grpo import warm_start_batch
    tok = load_tokenizer("smollm2-135m")
    train = [t for t in synth_tasks if t["split"] == "train" and t["kind"] == "single_table"]
    tasks = {t["id"]: t for t in train}

    def batch(*flags):
        cache = {}
        eps = warm_start_batch(tok, train, cache, random.Random(0), get_args(["--sft-batch", "4", *flags]))
        return [(tasks[k[0]], k, tok.decode(e.tokens)) for k, e in zip(cache, eps)]

    out = batch()
    assert len(out) == 4 and all(plan_text(t) in text for t, _, text in out)  # the default: the plan, unquoted
    assert all(plan_text(t, quote=True) in text for t, _, text in batch("--sft-quote-labels"))
    assert not any("Plan:" in text for _, _, text in batch("--sft-plan", "off"))
    assert all(k[1] is not None for _, k, _ in batch("--sft-detours", "1"))
    assert all(k[1] is None for _, k, _ in batch("--sft-detours", "0"))
    misread = batch("--sft-misreads", "1")
    assert any(k[3] is not None for _, k, _ in misread)
    assert all(k[3] == pick_misread(t, 8) for t, k, _ in misread)


def test_near_miss_labels_hand_written():
    assert near_miss_labels("Property, plant and equipment, net") == ["Net property, plant and equipment",
                                                                      "Total property, plant and equipment, net"]
    assert near_miss_labels("Total dividends paid ($ millions)") == ["Total dividends paid", "Dividends paid ($ millions)"]
    assert near_miss_labels("Total employees") == ["Employees"]
    assert near_miss_labels("Net income") == ["Total net income"]
    assert near_miss_labels("Q3") == ["Total Q3"]


def trained_spans(ep):
    """The token runs with mask 1: the assistant messages that are cloned, in order."""
    spans, cur = [], []
    for x, m in zip(ep.tokens + [None], ep.mask + [0]):
        if m:
            cur.append(x)
        elif cur:
            spans, cur = spans + [cur], []
    return spans


@pytest.mark.parametrize("plan", [False, "early", "late"])
def test_oracle_misread_clones_the_fix_not_the_miss(default_model, synth_tasks, plan):
    import sqlite3
    _, tok = default_model
    single = [t for t in synth_tasks if t["kind"] == "single_table"][:40]
    picked = 0
    for t in single:
        miss = pick_misread(t, max_turns=8)
        if miss is None:
            continue
        picked += 1
        c = t["gold_cells"][0]
        # SQLite itself: the table holds the real label and not the miss, in any case
        with sqlite3.connect(t["db_path"]) as con:
            count = lambda label: con.execute(f'SELECT COUNT(*) FROM "{c["table"]}" WHERE lower(item) = lower(?)',
                                              (label,)).fetchone()[0]
            assert count(miss) == 0 and count(c["item"]) >= 1
        with SQLEnv(t["db_path"]) as env:
            msgs = oracle_episode(t, env, plan=plan, misread=miss)[0]
        ep = episode_from_messages(tok, t, msgs)
        straight = episode_from_messages(tok, t, oracle_messages(t, plan))
        assert ep.reward == 1.0 and ep.turns == straight.turns + 1 <= 8
        # what is cloned is the straight oracle's messages, token for token, its plan included: the miss is the only
        # extra turn, and it is context
        assert trained_spans(ep) == trained_spans(straight)
        cloned = tok.decode([x for x, m in zip(ep.tokens, ep.mask) if m])
        context = tok.decode([x for x, m in zip(ep.tokens, ep.mask) if not m])
        quoted = "'" + miss.replace("'", "''") + "'"  # as a SQL literal; a miss can be a prefix of the label
        assert quoted not in cloned and quoted in context
        # the empty result names the real label (as the closest, or in the row labels it lists), so the fix is a copy
        # of text on screen
        i = next(k for k, m in enumerate(msgs) if m.get("train") is False and m["tool_calls"][0]["name"] == "sql_query")
        assert msgs[i + 1]["content"].startswith("(no rows)") and c["item"] in msgs[i + 1]["content"].partition("\n")[2]
        if plan:  # the plan names the label the table holds, never the miss
            said = next(m["content"] for m in msgs if "Plan:" in m["content"])
            assert f"= {c['item']} ({c['column']})" in said and f"= {miss} ({c['column']})" not in said
    assert picked >= len(single) // 2
    # --sft-misreads 0 draws nothing, so earlier runs replay their task draws; 1 gives every task that has a miss one
    rng = random.Random(0)
    state = rng.getstate()
    oracle_episodes(tok, single[:3], {}, rng, 0.0, plan=plan, misread_p=0.0)
    assert rng.getstate() == state
    cache = {}
    oracle_episodes(tok, single[:6], cache, rng, 0.0, plan=plan, misread_p=1.0)
    assert [k[3] for k in cache] == [pick_misread(t, 8) for t in single[:6]]


def test_rollout_stream_equals_rendered_transcript(default_model, synth_tasks):
    model, tok = default_model
    tasks = synth_tasks[:2]
    eps = run_episodes(model, tok, tasks, group_size=2, max_turns=3, max_tokens=1200, max_new_tokens=32,
                       temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert [e.task["id"] for e in eps] == [tasks[0]["id"]] * 2 + [tasks[1]["id"]] * 2
    for e in eps:
        assert tok.decode(e.tokens) == render_episode_text(tok, e)
        assert len(e.tokens) == len(e.mask) == len(e.logprobs) and e.mask[: e.prompt_len] == [0] * e.prompt_len
        assert all(lp <= 0 for lp in e.logprobs) and all(lp == 0 for lp, m in zip(e.logprobs, e.mask) if not m)
        assert e.finish in ("answer", "turn_limit", "token_budget", "turn_tokens")
        assert e.truncated == (e.finish != "answer") and (e.reward == 0 or e.finish == "answer")
    # the engine's log-probs equal the trainer's recomputation (same fp32 weights, temperature 1)
    ids, mask, rlp = collate(eps, "cpu")
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, mask, 1.0)
    assert ((logp - rlp).abs() * mask).max().item() < 2e-3


def test_tasks_batched_together_roll_out_as_each_alone(default_model, synth_tasks):
    """Tasks in one batch share their prompt's opening (system prompt and tool schemas), prefilled once and forked
    into each task's row before its own tail: greedy episodes equal those of each task run alone, turn for turn."""
    model, tok = default_model
    tasks = synth_tasks[:3]
    kw = dict(max_turns=2, max_tokens=1200, max_new_tokens=24, temperature=0.0)
    together = run_episodes(model, tok, tasks, group_size=1, **kw)
    assert common_prefix_len([prompt_ids(tok, t) for t in tasks]) > 500  # the shared opening
    for t, ep in zip(tasks, together):
        alone = run_episodes(model, tok, [t], group_size=1, **kw)[0]
        assert ep.tokens == alone.tokens and ep.mask == alone.mask
        assert max(abs(a - b) for a, b in zip(ep.logprobs, alone.logprobs)) < 1e-4


def test_top_k_top_p_reach_the_sampler_and_the_trainer(default_model, synth_tasks):
    """--top-k/--top-p restrict the rollout's sampling set, and the trainer restricts its log-probs to the same set,
    so the importance ratio compares like with like (without the filter the two disagree)."""
    model, tok = default_model
    eps = run_episodes(model, tok, synth_tasks[:1], group_size=2, max_turns=2, max_tokens=1200, max_new_tokens=24,
                       temperature=1.0, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(3))
    ids, mask, rlp = collate(eps, "cpu")
    with torch.no_grad():
        filtered, _ = token_logprobs(model, ids, mask, 1.0, top_k=5, top_p=0.9)
        plain, _ = token_logprobs(model, ids, mask, 1.0)
        logits = model(ids)[:, :-1]
    assert ((filtered - rlp).abs() * mask).max().item() < 2e-3
    assert ((plain - rlp).abs() * mask).max().item() > 0.05  # the filter renormalizes: it raises log-probs
    rank = (logits > logits.gather(-1, ids[:, 1:, None])).sum(-1)  # how many tokens beat the sampled one
    assert (rank[mask.bool()] < 5).all()


def test_mask_truncated_leaves_truncated_episodes_out_of_the_update():
    args = get_args(["--mask-truncated", "--wandb", "off"])
    assert args.mask_truncated and not get_args(["--wandb", "off"]).mask_truncated
    finish = ["answer", "token_budget", "answer", "answer", "turn_limit", "answer"]
    eps = [Episode({"id": f"t{i // 3}"}, [1, 2], [0, 1], [0.0, -1.0], 1, finish=f) for i, f in enumerate(finish)]
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # the second group has no signal
    adv, keep = group_advantages(rewards)
    a0 = (1 - 1 / 3) / math.sqrt(1 / 3)  # hand-computed: mean 1/3, sample std sqrt(1/3)
    every = episodes_for_update(eps, adv, keep, 3, mask_truncated=False)
    assert [e.finish for e, _ in every] == ["answer", "token_budget", "answer"]
    assert math.isclose(every[0][1], a0, rel_tol=1e-5) and math.isclose(every[1][1], -a0 / 2, rel_tol=1e-5)
    masked = episodes_for_update(eps, adv, keep, 3, mask_truncated=args.mask_truncated)
    assert [e for e, _ in masked] == [eps[0], eps[2]]  # the truncated one is out; the others keep their advantages
    assert [a for _, a in masked] == [every[0][1], every[2][1]]


def test_budget_truncation_is_flagged(default_model, synth_tasks):
    model, tok = default_model
    eps = run_episodes(model, tok, synth_tasks[:1], group_size=2, max_turns=2, max_tokens=700, max_new_tokens=8,
                       temperature=1.0, generator=torch.Generator().manual_seed(1))
    for e in eps:
        assert e.finish in ("turn_tokens", "token_budget", "turn_limit", "answer")
        if e.finish in ("turn_tokens", "token_budget"):
            assert e.truncated and e.reward == 0 and e.rubric["truncated"] and not e.stopped


@pytest.mark.parametrize("case", ["scored_prefix", "identical_rows"])
def test_shared_prefix_logprobs_equal_plain(tiny_qwen3, case):
    """Running the rows' common prefix once (scored positions included) gives the log-probs, entropies and gradients
    of running every row in full, with rows that score different positions inside the prefix."""
    model = from_pretrained(tiny_qwen3[0])
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 512, (9,), generator=g)
    ids = torch.stack([torch.cat([prefix, torch.randint(0, 512, (7,), generator=g)]) for _ in range(3)])
    if case == "identical_rows":
        ids = ids[:1].expand(3, -1).clone()
    mask = torch.zeros(3, 15)
    mask[:2, 3:] = 1  # rows 0 and 1 score from inside the shared prefix
    mask[2, 6:8] = mask[2, 10:] = 1  # row 2 skips some positions the others score
    assert shared_prefix_len(ids[:, :-1]) == (9 if case == "scored_prefix" else 14)
    weight = torch.linspace(-1, 1, 15)[None] * torch.tensor([[1.0], [-2.0], [0.5]])  # per row and position
    outs = []
    for share in (False, True):
        model.zero_grad()
        lp, ent = token_logprobs(model, ids, mask, 0.8, share_prefix=share)
        (lp * weight).sum().backward()
        outs.append((lp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    (a, ea, ga), (b, eb, gb) = outs
    assert ((a != 0) == mask.bool()).all() and ((b != 0) == mask.bool()).all()  # filled exactly where scored
    assert (a - b).abs().max().item() < 1e-5 and (ea - eb).abs().max().item() < 1e-5
    # the same gradients too: each row's weight reaches the shared positions it scores, and the prefix's keys and
    # values get theirs through every row
    assert max((x - y).abs().max().item() for x, y in zip(ga, gb)) < 1e-4


def test_micro_batches_hand_computed():
    """Splits that minimize P + n (longest - P) per micro-batch, worked out by hand."""
    p = list(range(100, 110))  # 10 tokens all rows share
    rows = [p + [1] * 10, p + [2] * 10, p + [3] * 10, p + [4] * 90]  # lengths 20, 20, 20, 100
    # together: 10 + 4 x 90 = 370; the long row alone: (10 + 3 x 10) + 100 = 140; [0, 1] [2] [3]: 30 + 20 + 100 = 150
    assert micro_batches(rows, 8) == [[0, 1, 2], [3]]
    # rows of equal length sharing nothing cost the same together or apart: they stay together
    assert micro_batches([[i] * 30 for i in range(4)], 8) == [[0, 1, 2, 3]]
    # identical rows run once together (10 tokens for the shared 10), at most cap rows each
    mbs = micro_batches([p] * 10, 4)
    assert sorted(i for mb in mbs for i in mb) == list(range(10)) and max(map(len, mbs)) == 4
    assert micro_batches([p], 8) == [[0]]


# --- the trainer -----------------------------------------------------------------------------------------------------

def test_one_step_moves_logprobs_by_advantage_sign(tiny_qwen3):
    model = from_pretrained(tiny_qwen3[0])
    g = torch.Generator().manual_seed(0)
    task = {"id": "t"}
    eps = []
    for i in range(2):
        toks = torch.randint(0, 512, (20,), generator=g).tolist()
        eps.append(Episode({"id": f"t{i}"}, toks, [0] * 10 + [1] * 10, [0.0] * 20, 10))
    args = get_args(["--lora-rank", "0", "--lr", "1e-2", "--no-autocast", "--is-cap", "0", "--wandb", "off"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, mask, _ = collate(eps, "cpu")
    with torch.no_grad():
        before, _ = token_logprobs(model, ids, mask)
    update(model, opt, eps, [1.0, -1.0], args, 1e-2, sampled=False)
    with torch.no_grad():
        after, _ = token_logprobs(model, ids, mask)
    gain = ((after - before) * mask).sum(1) / mask.sum(1)
    assert gain[0] > 0 > gain[1], gain


def test_warm_start_clones_at_temperature_1_and_rollouts_train_at_theirs(tiny_qwen3):
    """The warm start's NLL is that of the model's own distribution whatever --temperature; GRPO updates use the
    rollouts' temperature. References: log_softmax of a plain forward, at 1 and at 0.5."""
    model = from_pretrained(tiny_qwen3[0])
    g = torch.Generator().manual_seed(2)
    eps = [Episode({"id": f"t{i}"}, torch.randint(0, 512, (18,), generator=g).tolist(), [0] * 8 + [1] * 10,
                   [0.0] * 18, 8) for i in range(2)]
    ids, mask, _ = collate(eps, "cpu")
    with torch.no_grad():
        logits = model(ids)[:, :-1]  # (2, 17, V) predicting ids[:, 1:]

    def ref_nll(t):
        lp = torch.log_softmax(logits / t, -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (-(lp * mask).sum() / mask.sum()).item()

    args = get_args(["--temperature", "0.5", "--no-autocast", "--wandb", "off", "--lora-rank", "0"])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sft = update(model, opt, eps, [1.0, 1.0], args, 0.0, sampled=False)
    grpo = update(model, opt, eps, [1.0, -1.0], args, 0.0, sampled=True)
    assert abs(sft["nll"] - ref_nll(1.0)) < 1e-4 and abs(grpo["nll"] - ref_nll(0.5)) < 1e-4
    assert abs(ref_nll(1.0) - ref_nll(0.5)) > 0.1  # the two references differ, so the test can tell them apart


@pytest.fixture(scope="module")
def tiny_qwen3_with_tokenizer(tmp_path_factory, qwen3_tokenizer_dir):
    """A tiny random Qwen3 with the real Qwen3 vocabulary and tokenizer files."""
    from conftest import TINY, make_hf_model
    path = str(tmp_path_factory.mktemp("tiny_qwen3_tok"))
    TINY["qwen3_vocab"] = dict(TINY["qwen3"], vocab_size=151936)
    make_hf_model("qwen3_vocab", path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(qwen3_tokenizer_dir, f), os.path.join(path, f))
    return path


def run_args(model, tasks_file, out, *extra):
    return ["--model", model, "--tasks", tasks_file, "--out", out, "--train-split", "train", "--sft-batch", "2",
            "--tasks-per-step", "1", "--group-size", "2", "--max-turns", "2", "--max-new-tokens", "12",
            "--max-tokens", "2048", "--eval-tasks", "1", "--eval-every", "100", "--wandb", "off", "--lora-rank", "0",
            "--rollout-dtype", "float32", "--no-autocast", "--micro-batch", "2", "--threads", "2", *extra]


def test_two_step_run_writes_checkpoint_that_eval_loads(tiny_qwen3_with_tokenizer, synth_tasks, tmp_path, capsys):
    import eval as evaluation
    tasks_file = os.path.join(os.path.dirname(os.path.dirname(synth_tasks[0]["db_path"])), "tasks.jsonl")
    out = str(tmp_path / "run")
    threads = torch.get_num_threads()  # conftest's 2
    main(run_args(tiny_qwen3_with_tokenizer, tasks_file, out, "--sft-steps", "1", "--steps", "2", "--save-every", "1",
                  "--keep", "1", "--threads", "1"))
    assert torch.get_num_threads() == 1  # --threads reached torch
    # the ETA is the phase's own: the warm start's line names the GRPO steps still to come, the last line has none left
    printed = capsys.readouterr().out.splitlines()
    assert "  reward: 1 for the right number, else 0, --guess-penalty 0.5" in printed  # the default's one term
    steps = [l for l in printed if l.startswith("step ")]
    assert [l.split(" | ")[-1].split("step ", 1)[1] for l in (steps[0], steps[-1])] == [
        "ETA 00:00:00 (warm start; 2 GRPO steps after)", "ETA 00:00:00"]
    torch.set_num_threads(threads)
    # the evaluation command the run prints at its end is one eval.py runs: the final checkpoint beside the warm
    # start's and the base (here cut to one task and short episodes)
    hint = shlex.split(next(l for l in printed if l.startswith("test it: ")).split("  (")[0])[4:]
    shown = evaluation.main(hint + ["--limit", "1", "--max-turns", "2", "--max-new-tokens", "8", "--dtype", "float32"])
    assert [r["ckpt"] for r in shown["reports"]] == [os.path.join(out, "step_3"), os.path.join(out, "step_1"),
                                                     tiny_qwen3_with_tokenizer]
    # the newest checkpoint, and the warm start's whatever --keep (GRPO seeds start from it with --init-from)
    assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_1", "step_3"]
    ckpt = os.path.join(out, "step_3")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "trainer_state.pt"} <= set(os.listdir(ckpt))
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["phase"] for r in recs] == ["sft", "grpo", "grpo"] and "reward" in recs[1]
    assert "val/pass@1_greedy" in recs[0] and "val/pass@1_greedy" in recs[2]  # the end of each phase (--eval-every 100)
    import plot
    plot.main([out])
    assert open(os.path.join(out, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    args = evaluation.argparse.Namespace(samples=2, temperature=1.0, max_turns=2, max_tokens=2048, max_new_tokens=8,
                                         batch_tasks=2, dtype="float32", seed=0, greedy=True,
                                         repeat_note=False)
    rep, eps = evaluation.eval_model(ckpt, synth_tasks[:2], args)
    assert rep["n_tasks"] == 2 and "pass@1" in rep and "pass@2" in rep and len(eps) == 2 * 2 + 2
    # --no-greedy: the same sampled episodes (greedy decoding draws nothing from the generator), and no greedy score
    rep_s, eps_s = evaluation.eval_model(ckpt, synth_tasks[:2], evaluation.argparse.Namespace(**{**vars(args), "greedy": False}))
    assert [e.tokens for e in eps_s] == [e.tokens for e in eps[:4]] and rep_s["pass@1"] == rep["pass@1"]
    assert "greedy" in rep and "greedy" not in rep_s and all("greedy" not in v for v in rep_s["by_kind"].values())
    # the CLI with its report in the run's folder leaves the trainer's rollout transcripts as they were
    before = open(os.path.join(out, "transcripts.jsonl"), "rb").read()
    evaluation.main(["--ckpt", ckpt, "--tasks", tasks_file, "--split", "train", "--limit", "1", "--samples", "0",
                     "--max-turns", "2", "--max-new-tokens", "8", "--dtype", "float32", "--json",
                     os.path.join(out, "eval_report.json")])
    assert open(os.path.join(out, "transcripts.jsonl"), "rb").read() == before
    lines = [json.loads(l) for l in open(os.path.join(out, "eval_transcripts.jsonl"))]
    assert [r["ckpt"] for r in lines] == [ckpt] and "pass@1" in json.load(open(os.path.join(out, "eval_report.json")))
    # --compare with that report: its column comes back as saved beside a fresh run of the warm start (the table,
    # paired rows included, prints without error); a report over other tasks or other settings is refused by name
    saved = os.path.join(out, "eval_report.json")
    common = ["--tasks", tasks_file, "--split", "train", "--samples", "0", "--max-new-tokens", "8", "--dtype", "float32"]
    both = evaluation.main(["--ckpt", os.path.join(out, "step_1"), "--compare", saved, "--limit", "1",
                            "--max-turns", "2", "--json", str(tmp_path / "both.json")] + common)
    assert [r["ckpt"] for r in both["reports"]] == [os.path.join(out, "step_1"), ckpt]
    assert both["reports"][1] == json.load(open(saved))["reports"][0]
    # saved reports alone (--ckpt a report too): the table of earlier evaluations with nothing rerun. The first one's
    # checkpoint is renamed to a folder that does not exist, so a rerun would fail instead of passing unseen
    gone = json.load(open(saved))
    gone["reports"][0]["ckpt"] = str(tmp_path / "deleted" / "step_9")
    json.dump(gone, open(tmp_path / "gone.json", "w"))
    table = evaluation.main(["--ckpt", str(tmp_path / "gone.json"), "--compare", str(tmp_path / "both.json"),
                             "--limit", "1", "--max-turns", "2"] + common)
    assert table["reports"] == gone["reports"] + both["reports"]
    for extra, why in ((["--limit", "2", "--max-turns", "2"], "other tasks"), (["--limit", "1", "--max-turns", "3"],
                                                                              "max_turns = 2"),
                       (["--limit", "1", "--max-turns", "2", "--repeat-note"], "repeat_note = False")):
        with pytest.raises(SystemExit, match=f"--compare {re.escape(saved)}: .*{why}"):
            evaluation.main(["--ckpt", ckpt, "--compare", saved] + extra + common)
    # a comparison stopped during its second checkpoint (here: one that does not exist) keeps the first one's report
    part = tmp_path / "part"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluation.main(["--ckpt", ckpt, "--compare", str(tmp_path / "nowhere"), "--limit", "1", "--max-turns", "2",
                         "--out", str(part)] + common)
    kept = json.load(open(part / "eval_report.json"))
    assert [r["ckpt"] for r in kept["reports"]] == [ckpt] and kept["reports"][0]["per_task"]["greedy"] == \
        json.load(open(saved))["reports"][0]["per_task"]["greedy"]
    assert sorted(os.listdir(part)) == ["eval_report.json", "eval_transcripts.jsonl"]  # no temporary file left
    # a report from before env_sql.ENV_VERSION (its tools said other things) is refused too
    old_env = json.load(open(saved))
    del old_env["reports"][0]["settings"]["env_version"], old_env["reports"][0]["settings"]["repeat_note"]
    json.dump(old_env, open(tmp_path / "old_env.json", "w"))
    with pytest.raises(SystemExit, match=f"env_version = 1, this run has {evaluation.ENV_VERSION}"):
        evaluation.main(["--ckpt", ckpt, "--compare", str(tmp_path / "old_env.json"), "--limit", "1",
                         "--max-turns", "2"] + common)


def test_plot_summary_hand_computed():
    import plot
    g = lambda step, step_s, roll, pass_rate, zv, **kw: {"phase": "grpo", "step": step, "step_s": step_s, "rollout_s": roll,  # noqa: E731
                                                         "reward": pass_rate, "pass_rate": pass_rate, "zero_var_frac": zv, **kw}
    recs = [{"phase": "sft", "step": 1, "step_s": 10.0}, {"phase": "sft", "step": 2, "step_s": 20.0},
            g(3, 30.0, 20.0, 0.5, 0.5, update_s=8.0), g(4, 50.0, 25.0, 0.0, 1.0, **{"val/pass@1_greedy": 0.1}),
            g(5, 40.0, 30.0, 0.25, 0.0, update_s=6.0)]
    table = {line[:34].strip(): line[34:].split() for line in plot.summary(recs)}
    assert table["warm-start step, s"] == ["2", "15.0"] and table["GRPO step, s"] == ["3", "40.0"]
    assert table["without validation passes"] == ["2", "35.0"]  # step 4 ran one
    assert table["rollout, s"] == ["3", "25.0"] and table["update, s (steps with one)"] == ["2", "7.0"]
    assert table["pass rate"] == ["0.250", "0.250", "0.250"]  # halves: steps 3-4, step 5
    assert table["groups with signal"] == ["0.250", "1.000", "0.500"]


def test_resume_gives_the_same_weights(tiny_qwen3_with_tokenizer, synth_tasks, tmp_path, capsys):
    """Killed after the first GRPO step and resumed: the same weights, and the same per-template pass counts that
    --task-sampling learnability draws from (lost counts would make the resumed run draw other tasks)."""
    tasks_file = os.path.join(os.path.dirname(os.path.dirname(synth_tasks[0]["db_path"])), "tasks.jsonl")
    common = ("--sft-steps", "1", "--steps", "2", "--save-every", "1", "--keep", "5", "--task-sampling", "learnability",
              "--sft-detours", "0.5", "--sft-misreads", "0.5", "--eval-tasks", "0")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    main(run_args(tiny_qwen3_with_tokenizer, tasks_file, a, *common))
    main(run_args(tiny_qwen3_with_tokenizer, tasks_file, b, *common, "--stop-at", "0"))  # stops before any step
    assert not any(d.startswith("step_") for d in os.listdir(b)) and not os.path.exists(os.path.join(b, "metrics.jsonl"))
    main(run_args(tiny_qwen3_with_tokenizer, tasks_file, b, *common, "--stop-at", "2"))
    assert not os.path.exists(os.path.join(b, "step_3"))
    # killed once more, after step 3 logged its rollouts but before its checkpoint was renamed into place
    main(run_args(tiny_qwen3_with_tokenizer, tasks_file, b, *common, "--resume"))
    shutil.rmtree(os.path.join(b, "step_3"))
    capsys.readouterr()
    main(run_args(tiny_qwen3_with_tokenizer, tasks_file, b, *common, "--resume"))
    assert "flags differ" not in capsys.readouterr().out  # only --stop-at and --resume changed
    # the replayed step's metrics and transcripts are written once, as in the run never killed
    ta, tb = (open(os.path.join(d, "transcripts.jsonl")).read() for d in (a, b))
    assert ta == tb and ta.count("\n") == 2 * 2  # 2 GRPO steps x 1 task x 2 episodes
    assert not any(k.startswith("val/") for l in open(os.path.join(b, "metrics.jsonl")) for k in json.loads(l))
    wa, wb = from_pretrained(os.path.join(a, "step_3")), from_pretrained(os.path.join(b, "step_3"))
    for (n, p), (_, q) in zip(wa.named_parameters(), wb.named_parameters()):
        assert torch.equal(p, q), n
    sa, sb = (torch.load(os.path.join(d, "step_3", "trainer_state.pt"), weights_only=False)["task_stats"] for d in (a, b))
    assert sa == sb and sum(n for _, n in sa.values()) == 2 * 2  # 2 GRPO steps x 1 task x 2 episodes
    recs = [[json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))] for d in (a, b)]
    assert len(recs[1]) == 3 and [r.get("templates") for r in recs[0]] == [r.get("templates") for r in recs[1]]
    # a run saved before a flag existed (here --guess-penalty, whose default is not the old behavior): it is named
    state_file = os.path.join(b, "step_3", "trainer_state.pt")
    state = torch.load(state_file, weights_only=False)
    del state["args"]["guess_penalty"]
    torch.save(state, state_file)
    main(run_args(tiny_qwen3_with_tokenizer, tasks_file, b, *common, "--resume", "--lr", "1e-4"))  # finished: no step
    printed = capsys.readouterr().out
    assert "--lr 5e-05 -> 0.0001, --guess-penalty (new since that run) 0.5" in printed
    # --init-from a's step 2 with another seed: a's weights, optimizer and step, this run's randomness
    c = str(tmp_path / "c")
    capsys.readouterr()
    main(run_args(tiny_qwen3_with_tokenizer, tasks_file, c, *common, "--init-from", os.path.join(a, "step_2"),
                  "--seed", "1", "--guess-penalty", "0", "--repeat-penalty", "0.25"))
    printed = capsys.readouterr().out
    assert "task draws start over" not in printed
    assert "\n  reward: 1 for the right number, else 0, --repeat-penalty 0.25\n" in printed  # the log names its reward
    assert sorted(d for d in os.listdir(c) if d.startswith("step_")) == ["step_3"]  # no warm start, one GRPO step
    # the evaluation it prints puts the warm start it started from beside it (this run has no step_2 of its own)
    assert f"--ckpt {os.path.join(c, 'step_3')} --compare {os.path.join(a, 'step_2')} {tiny_qwen3_with_tokenizer} " in printed
    assert [json.loads(l)["step"] for l in open(os.path.join(c, "metrics.jsonl"))] == [3]
    a3, c3 = ([json.loads(l)["text"] for l in open(os.path.join(d, "transcripts.jsonl"))][-2:] for d in (a, c))
    assert a3 != c3  # seed 1's rollouts, not a replay of a's step 3
    base, wa2, wc3 = (from_pretrained(p) for p in (tiny_qwen3_with_tokenizer, os.path.join(a, "step_2"), os.path.join(c, "step_3")))
    for (n, p0), (_, p2), (_, p3) in zip(base.named_parameters(), wa2.named_parameters(), wc3.named_parameters()):
        assert (p3 - p2).abs().max() < (p2 - p0).abs().max(), n  # one GRPO step away from a's step 2, not from the base
    sa2, sc3 = (torch.load(os.path.join(d, "trainer_state.pt"), weights_only=False) for d in (os.path.join(a, "step_2"), os.path.join(c, "step_3")))
    assert sc3["optimizer"]["state"][0]["step"] >= sa2["optimizer"]["state"][0]["step"] >= 1  # Adam's moments carried on
    # with a's own seed the draws replay a's first ones, and the run says so
    main(run_args(tiny_qwen3_with_tokenizer, tasks_file, str(tmp_path / "e"), *common, "--init-from",
                  os.path.join(a, "step_2"), "--stop-at", "2"))
    assert "that run had --seed 0 too, so this run's task draws start over" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--lora-rank 0"):  # a checkpoint trained another way is refused by name
        main(run_args(tiny_qwen3_with_tokenizer, tasks_file, str(tmp_path / "d"), *common, "--init-from",
                      os.path.join(a, "step_2"), "--lora-rank", "4"))


def test_kl_reference_is_the_policy_grpo_started_from(tiny_qwen3):
    """--kl-beta's reference, handed to update() as load_reference returns it. LoRA adapters moved away from zero (a
    warm start) as the reference: k3 is 0 at the first GRPO step and so is its gradient, so the update is exactly
    --kl-beta 0's, and the reference pass leaves the policy's adapters as they were. The base as the reference
    (adapters disabled: the warm start's tool calls penalized) gives a KL > 0 and another update. Full fine-tuning:
    a frozen copy of the policy, the same. The model carries the engine's packed weights (LoRA merged in), as in a
    run: the no-grad reference pass must not read them, or its rounding differs from the gradient pass's."""
    import copy
    from model import add_lora, pack_weights

    def run(reference_of, lora, *flags):
        torch.manual_seed(0)
        model = from_pretrained(tiny_qwen3[0])
        if lora:
            add_lora(model, rank=4, alpha=8)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.2)
        g = torch.Generator().manual_seed(1)
        eps = []
        for n in (14, 20):
            toks = torch.randint(0, 512, (n,), generator=g).tolist()
            lps = (-torch.rand(n, generator=g) * 12).tolist()
            eps.append(Episode({"id": "t"}, toks, [0] * 6 + [1] * (n - 6), [0.0] * 6 + lps[6:], 6))
        args = get_args(["--no-autocast", "--wandb", "off", "--lora-rank", "4" if lora else "0", *flags])
        reference = reference_of(model)
        pack_weights(model, "plain")
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        stats = update(model, torch.optim.SGD(params, lr=1.0), eps, [1.0, -1.0], args, 1.0, reference)
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]), stats["kl"]

    adapters = lambda m: {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}  # noqa: E731
    plain, _ = run(lambda m: None, True)
    same, kl_same = run(adapters, True, "--kl-beta", "0.5")
    base, kl_base = run(lambda m: None, True, "--kl-beta", "0.5")
    assert kl_same == 0.0 and torch.equal(same, plain)
    assert kl_base > 1e-3 and differs(base, plain)
    frozen = lambda m: copy.deepcopy(m).eval().requires_grad_(False)  # noqa: E731
    full_plain, _ = run(lambda m: None, False)
    full_same, kl_full = run(frozen, False, "--kl-beta", "0.5")
    assert kl_full == 0.0 and torch.equal(full_same, full_plain) and full_plain.abs().max() > 0


def test_load_reference_reads_the_warm_start_checkpoint(tiny_qwen3_with_tokenizer, synth_tasks, tmp_path):
    """The reference is read from disk, so a resumed run has the same one: the warm start's checkpoint (its adapters,
    moved away from zero), never the base while a warm start exists; the base when GRPO starts from it; a clear
    error when the warm start's checkpoint is gone."""
    from train_grpo import load_reference
    tasks_file = os.path.join(os.path.dirname(os.path.dirname(synth_tasks[0]["db_path"])), "tasks.jsonl")
    out = str(tmp_path / "w")
    main(run_args(tiny_qwen3_with_tokenizer, tasks_file, out, "--sft-steps", "1", "--steps", "0", "--lora-rank", "4",
                  "--sft-lr", "1e-2"))
    saved = torch.load(os.path.join(out, "step_1", "trainer_state.pt"), weights_only=False)["lora"]
    args = get_args(run_args(tiny_qwen3_with_tokenizer, tasks_file, out, "--sft-steps", "1", "--lora-rank", "4",
                             "--kl-beta", "0.5"))
    ref = load_reference(args)
    assert ref.keys() == saved.keys() and all(torch.equal(ref[k], saved[k]) for k in ref)
    assert any(v.abs().max() > 0 for k, v in ref.items() if "lora_B" in k)  # the warm start moved B from zero
    args.sft_steps = 0
    assert load_reference(args) is None  # GRPO from the base: adapters disabled
    full = load_reference(get_args(run_args(tiny_qwen3_with_tokenizer, tasks_file, out, "--sft-steps", "0",
                                            "--kl-beta", "0.5")))
    base = from_pretrained(tiny_qwen3_with_tokenizer)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), base.parameters()))
    assert not any(p.requires_grad for p in full.parameters())
    args.sft_steps = 3
    with pytest.raises(SystemExit, match="step_3"):
        load_reference(args)


def test_learnability_sampling_hand_computed():
    from train_grpo import learnability, sample_tasks
    stats = {"a": [0, 16], "b": [8, 16], "d": [16, 16]}
    # p = (passed + 1) / (n + 2): a 1/18, b 9/18, c (unseen) 1/2, d 17/18; weight p (1 - p)
    assert learnability(stats, ["a", "b", "c", "d"]) == pytest.approx([17 / 324, 0.25, 0.25, 17 / 324])
    train = [{"id": f"{k}{i}", "template": k, "kind": "single_table"} for k in "ab" for i in range(2000)]
    args = get_args(["--task-sampling", "learnability", "--wandb", "off"])
    tasks = sample_tasks(train, 2000, args, random.Random(0), stats)
    assert len({t["id"] for t in tasks}) == 2000  # no task twice in one draw
    share_a = sum(t["template"] == "a" for t in tasks) / len(tasks)
    assert abs(share_a - (17 / 324) / (17 / 324 + 0.25)) < 0.03  # 0.173; uniform would give 0.5
    # uniform sampling is the plain draw it always was (runs before the flag replay the same tasks)
    args = get_args(["--wandb", "off"])
    assert sample_tasks(train, 3, args, random.Random(1), stats) == random.Random(1).sample(train, 3)


def test_warm_start_flags():
    # the plan warm start with detours is the default recipe; "off" gives the straight oracle
    assert get_args([]).sft_plan == "early" and get_args(["--sft-plan"]).sft_plan == "early"
    assert get_args(["--sft-plan", "off"]).sft_plan is None and get_args(["--sft-plan", "late"]).sft_plan == "late"


def test_model_flags_reach_the_model(tiny_qwen3):
    """Trap 8 for the flags that shape the trained model: where the adapters go, their scale, the weights' dtype."""
    from train_grpo import build_model
    tiny = tiny_qwen3[0]
    adapted = lambda model: [(n, m) for n, m in model.named_modules() if getattr(m, "lora_A", None) is not None]
    model, rollout = build_model(get_args(["--model", tiny, "--lora-rank", "4", "--lora-alpha", "12",
                                           "--lora-targets", "q_proj,down_proj", "--param-dtype", "float32"]))
    with_lora = {n.split(".")[-1] for n, _ in adapted(model)}
    assert with_lora == {"q_proj", "down_proj"} and rollout is model
    assert {m.lora_scale for _, m in adapted(model)} == {3.0}  # 12 / 4
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.float32}
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}  # the base is frozen
    model, _ = build_model(get_args(["--model", tiny, "--lora-rank", "8", "--param-dtype", "bfloat16"]))
    assert {m.lora_scale for _, m in adapted(model)} == {2.0}  # alpha = 2 r
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32  # adapters train in fp32
    with pytest.raises(ValueError, match="--lora-targets"):
        build_model(get_args(["--model", tiny, "--lora-rank", "4", "--lora-targets", "qproj"]))
    model, rollout = build_model(get_args(["--model", tiny, "--lora-rank", "0", "--param-dtype", "float32",
                                           "--rollout-dtype", "bfloat16"]))
    assert all(p.requires_grad for p in model.parameters())  # full fine-tuning
    assert rollout is not model and rollout.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_weight_decay_is_decoupled():
    """--weight-decay: with no gradient signal AdamW's first step only decays, w <- w (1 - lr wd), by hand."""
    from train_grpo import make_optimizer
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    for wd, factor in ((0.5, 1 - 0.1 * 0.5), (0.0, 1.0)):
        opt = make_optimizer([w], get_args(["--lr", "0.1", "--weight-decay", str(wd)]))
        before = w.detach().clone()
        w.grad = torch.zeros(3)
        opt.step()
        assert torch.allclose(w.detach(), before * factor)


def test_task_flags_select_tasks(synth_tasks):
    """--train-split, --train-kind, --val-split and --eval-tasks pick the tasks a run sees."""
    from train_grpo import select_tasks
    by = lambda key, ts: {t[key] for t in ts}
    train, val = select_tasks(synth_tasks, get_args(["--eval-tasks", "5"]))
    assert by("split", train) == {"train"} and by("kind", train) == {"single_table"}  # the seed's setting
    assert by("split", val) == {"val"} and len(val) == 5
    assert val == select_tasks(synth_tasks, get_args(["--eval-tasks", "5"]))[1]  # fixed per seed
    train, val = select_tasks(synth_tasks, get_args(["--train-kind", "multi_table", "--val-split", "test"]))
    assert by("kind", train) == {"multi_table"} and by("split", val) == {"test"}
    assert len(select_tasks(synth_tasks, get_args(["--train-kind", "all"]))[0]) == \
        sum(t["split"] == "train" for t in synth_tasks)
    with pytest.raises(SystemExit, match="no tasks with split 'nope'"):
        select_tasks(synth_tasks, get_args(["--train-split", "nope"]))


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        get_args(["--group-size", "1"])
    for flag in ("--eval-every", "--save-every", "--micro-batch"):
        with pytest.raises(SystemExit):  # 0 used to reach a modulo and raise ZeroDivisionError mid-run
            get_args([flag, "0"])
    for flag in ("--sft-detours", "--sft-misreads"):
        with pytest.raises(SystemExit):
            get_args([flag, "1.5"])
    bad = [(["--threads", "0"], "--threads must be >= 1"),
           (["--device", "gpu"], "--device 'gpu': not a torch device")]  # named at parse time, not deep in loading
    if not torch.cuda.is_available():
        bad.append((["--device", "cuda"], "--device cuda: torch sees no CUDA device"))
    for argv, why in bad:
        with pytest.raises(SystemExit):
            get_args(argv)
        assert why in capsys.readouterr().err
    p = tmp_path / "tasks.jsonl"
    p.write_text('{"id": "a", "question": "q", "answer": 1, "db": "nope.db", "kind": "single_table"}\n')
    with pytest.raises(FileNotFoundError, match="nope.db"):
        main(["--tasks", str(p), "--out", str(tmp_path / "o"), "--wandb", "off"])
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        empty = tmp_path / "m"
        empty.mkdir()
        (empty / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                                                        "intermediate_size": 8, "num_hidden_layers": 1,
                                                        "num_attention_heads": 2}))
        from data.synth import build
        build(str(tmp_path / "s"), companies=3)
        main(["--model", str(empty), "--tasks", str(tmp_path / "s" / "tasks.jsonl"), "--out", str(tmp_path / "o2"), "--wandb", "off"])


def differs(a, b):
    return (a - b).norm().item() > 1e-4 * b.norm().item()


def test_flags_change_the_update(tiny_qwen3):
    """Trap 8 of the notes: a knob that silently does nothing. Each of these must change one update's result."""
    from model import add_lora

    def delta(*flags, lora=False, sampled=True):
        torch.manual_seed(0)
        model = from_pretrained(tiny_qwen3[0])
        if lora:
            add_lora(model, rank=4, alpha=8)
            with torch.no_grad():
                for m in model.modules():
                    if getattr(m, "lora_B", None) is not None:
                        m.lora_B.normal_(0, 0.2)
        g = torch.Generator().manual_seed(1)
        eps, shared = [], torch.randint(0, 512, (10,), generator=g).tolist()  # a prefix with 4 scored tokens
        for i, n in enumerate((14, 20, 26)):  # different lengths, so the aggregations differ
            toks = shared + torch.randint(0, 512, (n - 10,), generator=g).tolist()
            lps = (-torch.rand(n, generator=g) * 12).tolist()  # rollout log-probs on both sides of the trainer's (~-6.2)
            eps.append(Episode({"id": "t"}, toks, [0] * 6 + [1] * (n - 6), [0.0] * 6 + lps[6:], 6))  # one group
        args = get_args(["--no-autocast", "--wandb", "off", "--lora-rank", "4" if lora else "0", "--lr", "1e-3", *flags])
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        update(model, torch.optim.SGD(params, lr=1.0), eps, [1.0, -0.5, 0.7], args, 1.0, sampled=sampled)
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])

    base = delta()
    for flags in (["--loss-agg", "token-mean"], ["--loss-agg", "seq-mean-token-sum-norm"], ["--is-cap", "0"],
                  ["--is-cap", "1.5"], ["--mu", "2"], ["--mu", "2", "--clip-high", "0.01", "--clip-low", "0.01"],
                  ["--temperature", "0.6"], ["--top-k", "5"], ["--top-p", "0.5"],
                  ["--grad-clip", "1e-4"]):
        assert differs(delta(*flags), base), flags
    assert differs(delta("--kl-beta", "0.5", lora=True), delta(lora=True))  # reference = adapters off
    sum_norm = ("--loss-agg", "seq-mean-token-sum-norm", "--grad-clip", "0")  # clipping would hide a pure scale
    assert differs(delta(*sum_norm, "--norm-len", "10"), delta(*sum_norm))
    # the warm start clones the oracle with token-mean whatever --loss-agg (the measured warm starts were made so)
    assert not differs(delta("--loss-agg", "token-mean", sampled=False), delta(sampled=False))
    assert not differs(delta("--grad-ckpt"), base)  # same math, less memory
    assert not differs(delta("--logprob-chunk", "3"), base)  # the vocabulary projection in chunks: same math
    assert not differs(delta("--no-share-prefix"), base)  # same math, more compute
    assert not differs(delta("--micro-batch", "1"), base)  # micro-batches add up to the batch's loss
    # the default splits this group as [14] [20, 26] (56 tokens run, 58 as one micro-batch); unsplit, the same update
    assert not differs(delta("--no-split-micro-batches"), base)
    from train_grpo import lr_at
    a = get_args(["--sft-steps", "2", "--steps", "10", "--warmup", "2", "--lr", "1.0", "--sft-lr", "4.0", "--schedule", "cosine"])
    assert [round(lr_at(s, a), 4) for s in (0, 1, 2, 3, 7)] == [2.0, 4.0, 0.5, round(0.5 * (1 + math.cos(math.pi / 10)), 4),
                                                               round(0.5 * (1 + math.cos(math.pi * 5 / 10)), 4)]
