"""The KV-cache engine against full forwards and against transformers' generate."""
import contextlib
import math
import platform

import pytest
import torch

import model
from model import (Engine, Linear, adapters_disabled, add_lora, bf16_fast, default_dtype, filter_logits, from_pretrained,
                   generate_batch, pack_weights, packs, sample)


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3):
    return from_pretrained(tiny_qwen3[0])


@pytest.fixture(params=["written", "flash"])
def chunk_attention(request, monkeypatch):
    """Chunks of more than one token attend through model.cached_attention (small scores, the default here) or, with
    the threshold at 0, SDPA's flash kernel (what long chunks take): both must equal the full forward."""
    if request.param == "flash":
        monkeypatch.setattr(model, "CHUNK_SCORES_MAX", 0)
    return request.param


def rand_ids(n, vocab=512, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device))[0].cpu()  # (T, V)


def uncached_greedy(model, seq, n):
    seq = list(seq)
    for _ in range(n):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    return seq[-n:]


def assert_logprobs_of_full_forward(model, context, gen):
    """gen's greedy log-probs equal log_softmax of the full forward over context + its tokens."""
    ref = torch.log_softmax(full_logits(model, context + gen.tokens), -1)[len(context) - 1:-1]  # (n, V)
    want = ref.gather(-1, torch.tensor(gen.tokens)[:, None])[:, 0]
    assert (torch.tensor(gen.logprobs) - want).abs().max().item() <= 1e-4


# block=8 makes the cache view grow (and move what it holds) several times within these short sequences
@pytest.mark.parametrize("block", [256, 8])
def test_cached_decode_equals_full_forward(qwen3, block, chunk_attention):
    ids = rand_ids(30)
    ref = full_logits(qwen3, ids)
    eng = Engine(qwen3, batch_size=2, max_len=64, block=block)
    got = [eng.feed([1], [ids[:10]])[0]]  # prefill 10, then one token at a time
    for t in ids[10:]:
        got.append(eng.feed([1], [[t]])[0])
    assert (torch.stack(got) - ref[9:]).abs().max().item() <= 1e-4


def test_engine_logits_equal_transformers_for_each_layout(tiny):
    """qwen3 (q/k norm, head_dim != hidden / heads, untied), qwen2 (q/k/v bias) and llama (one kv head): two rows of
    different lengths, prefilled as one batch, then decoded a token at a time, against transformers' logits on each
    row's whole sequence. On CPU the engine runs Block.forward_onednn here; with LoRA adapters (merged into its packs)
    disabled it must still give the base model's logits."""
    kind, path, hf = tiny
    m = from_pretrained(path)
    ids = [rand_ids(24, seed=1), rand_ids(17, seed=2)]
    with torch.no_grad():
        refs = [hf(torch.tensor([x])).logits[0] for x in ids]  # (T, V)

    def run():
        eng = Engine(m, batch_size=3, max_len=32)
        assert eng.onednn == model.onednn_packs(torch.float32)
        got = [[row] for row in eng.feed([0, 2], [ids[0][:12], ids[1][:5]])]
        for i in range(12):
            for r, row in enumerate(eng.feed([0, 2], [[ids[0][12 + i]], [ids[1][5 + i]]])):
                got[r].append(row)
        for r in range(2):  # the logits after each row's token 12 + i (row 0), 5 + i (row 1)
            start = (12, 5)[r]
            assert (torch.stack(got[r]) - refs[r][start - 1: start + 12]).abs().max().item() <= 1e-4, (kind, r)

    run()
    add_lora(m, rank=4, alpha=8)
    for mod in m.modules():
        if isinstance(mod, Linear) and mod.lora_B is not None:
            torch.nn.init.normal_(mod.lora_B, std=0.5)
    with adapters_disabled(m):
        run()


@pytest.mark.parametrize("block", [256, 8])
def test_chunk_at_nonzero_position(qwen3, block, chunk_attention):
    """A multi-token chunk appended after cached tokens (a tool response): T queries != cache length keys."""
    ids = rand_ids(40, seed=1)
    ref = full_logits(qwen3, ids)
    eng = Engine(qwen3, batch_size=1, max_len=64, block=block)
    eng.feed([0], [ids[:13]])
    eng.feed([0], [ids[13:21]])
    last = eng.feed([0], [ids[21:]])
    assert (last[0] - ref[-1]).abs().max().item() <= 1e-4
    # and the cached keys equal a fresh prefill's
    fresh = Engine(qwen3, batch_size=1, max_len=64)
    fresh.feed([0], [ids])
    assert (eng.k[1][0, :, :40] - fresh.k[1][0, :, :40]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("block", [256, 8])
def test_batch_of_different_lengths_equals_each_alone(qwen3, block, chunk_attention):
    prompts = [rand_ids(n, seed=n) for n in (5, 19, 11, 2)]
    eng = Engine(qwen3, batch_size=6, max_len=64, block=block)
    rows = [0, 2, 3, 5]  # non-contiguous rows take the gather path
    batched = eng.feed(rows, prompts)
    for i, p in enumerate(prompts):
        assert (batched[i] - full_logits(qwen3, p)[-1]).abs().max().item() <= 1e-4
    # now a second, ragged chunk to rows at different positions
    more = [rand_ids(n, seed=100 + n) for n in (3, 1, 7, 4)]
    batched = eng.feed(rows, more)
    for i, (p, q) in enumerate(zip(prompts, more)):
        assert (batched[i] - full_logits(qwen3, p + q)[-1]).abs().max().item() <= 1e-4


def test_ragged_chunks_are_fed_in_groups_and_returned_in_order(qwen3):
    """Chunks of 2..60 tokens are split into groups of similar length (to bound padding); the logits come back in
    the order of the rows given, and each equals that row's full forward."""
    prompts = [rand_ids(n, seed=50 + n) for n in (60, 2, 45, 3, 20)]
    rows = [4, 0, 2, 1, 3]
    eng = Engine(qwen3, batch_size=5, max_len=128, block=16)
    got = eng.feed(rows, prompts)
    for i, p in enumerate(prompts):
        assert (got[i] - full_logits(qwen3, p)[-1]).abs().max().item() <= 1e-4
        assert eng.pos[rows[i]] == len(p)
    eng.reset()
    assert eng.cap == 16 and eng.pos == [0] * 5  # a reset engine starts again from the smallest view


def test_fork_after_a_chunk_with_a_pending_token(qwen3):
    """What rollouts do when two rows of a group have the same stream: one row takes the chunk (after its pending
    stop token), the other gets a copy of that cache row. Both then continue as a full forward would."""
    prompt, nxt = rand_ids(9, seed=21), rand_ids(14, seed=22)
    eng = Engine(qwen3, batch_size=3, max_len=64, block=8)
    eng.feed([0], [prompt])
    eng.fork(0, [2])
    outs = eng.generate([0, 2], 1, temperature=0)  # each row's sampled token is pending
    assert eng.pending[0] == eng.pending[2] == outs[0].tokens
    eng.feed([0], [nxt])
    eng.fork(0, [2])
    assert eng.pending[2] == [] and eng.pos[2] == len(prompt) + 1 + len(nxt)
    seq = prompt + outs[0].tokens + nxt
    step = eng.generate([2], 3, temperature=0)[0].tokens
    assert step[0] == int(full_logits(qwen3, seq)[-1].argmax())
    assert step[1] == int(full_logits(qwen3, seq + step[:1])[-1].argmax())


def test_greedy_engine_equals_uncached_greedy(qwen3):
    prompts = [rand_ids(n, seed=7 * n) for n in (4, 9, 6)]
    outs = generate_batch(qwen3, prompts, max_new_tokens=12, temperature=0)
    for p, g in zip(prompts, outs):
        assert g.tokens == uncached_greedy(qwen3, p, 12)
        assert g.stop == "length"


@pytest.mark.parametrize("segment_cost", [0, 40, 10**9])
@pytest.mark.parametrize("limits", [(12, 3, 12, 5, 12), (12, 1, 1, 1, 1, 1, 1, 1, 1, 12)])
def test_decode_rows_with_gaps_equal_uncached_greedy(qwen3, limits, segment_cost, monkeypatch):
    """Rows that finish early leave gaps between the live ones. A decode step on CPU reads the cache in segments (row
    ranges, each up to its own deepest row; Engine.decode_segments): one per live row at segment cost 0, one range
    over all of them (the gaps' queries zero) at 10**9, a mix at 40 (rows of 3-21 tokens). Either way each row
    decodes as it would alone."""
    monkeypatch.setattr(model, "SEGMENT_COST", segment_cost)
    prompts = [rand_ids(3 + 2 * i, seed=300 + i) for i in range(len(limits))]
    eng = Engine(qwen3, batch_size=len(limits), max_len=64, block=8)
    eng.feed(list(range(len(limits))), prompts)
    outs = eng.generate(range(len(limits)), list(limits), temperature=0)
    for p, n, g in zip(prompts, limits, outs):
        assert g.tokens == uncached_greedy(qwen3, p, n)
        assert_logprobs_of_full_forward(qwen3, p, g)


@pytest.mark.parametrize("segment_cost", [0, 40, 10**9])
def test_decode_step_of_unordered_rows_equals_full_forward(qwen3, segment_cost, monkeypatch):
    """One token for rows given out of order, at depths 4-40, with a gap (row 2), then for rows 1 and 0 in that order:
    the logits come back in the order given, each equal to that row's full forward."""
    monkeypatch.setattr(model, "SEGMENT_COST", segment_cost)
    prompts = [rand_ids(n, seed=400 + n) for n in (40, 4, 25, 9, 31)]
    eng = Engine(qwen3, batch_size=5, max_len=64, block=8)
    eng.feed(list(range(5)), prompts)
    rows, toks = [3, 0, 4, 1], [7, 8, 9, 10]
    got = eng.feed(rows, [[t] for t in toks])
    for i, (r, t) in enumerate(zip(rows, toks)):
        assert (got[i] - full_logits(qwen3, prompts[r] + [t])[-1]).abs().max().item() <= 1e-4
    got = eng.feed([1, 0], [[11], [12]])  # every row of a range, out of order
    assert (got[0] - full_logits(qwen3, prompts[1] + [10, 11])[-1]).abs().max().item() <= 1e-4
    assert (got[1] - full_logits(qwen3, prompts[0] + [8, 12])[-1]).abs().max().item() <= 1e-4
    if segment_cost == 0:  # one segment per row, each as deep as its row
        segs = eng.decode_segments(rows, torch.zeros(4, 1, 1, 64))
        assert [(s[0], s[1]) for s in segs] == [(slice(r, r + 1), eng.pos[r] + 1) for r in sorted(rows)]


# The static decode step (CUDA's default: all rows, fixed shapes, compiled). On CPU eagerly and through torch.compile
# (inductor); on CUDA (skipped without one) compiled with CUDA graphs, in fp32. Against uncached greedy decoding: rows of
# different lengths, rows that finish early (their slots must not leak into live rows), and a chunk fed between turns.
# block 8 and 32: the capacity grows within the test (8 capacities eagerly, 2 compiled), and the compiled step is
# compiled once for both (the cache length is a symbolic size).
@pytest.mark.parametrize("device,compile,block", [
    ("cpu", False, 8), ("cpu", True, 32),
    pytest.param("cuda", True, 32, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_static_decode_step_equals_uncached_greedy(qwen3, tiny_qwen3, device, compile, block):
    from torch._dynamo.utils import counters
    model = qwen3 if device == "cpu" else from_pretrained(tiny_qwen3[0], device=device)
    eng = Engine(model, batch_size=4, max_len=64, block=block, static=True, compile=compile)
    graphs = counters["stats"]["unique_graphs"]
    prompts = [rand_ids(n, seed=11 * n) for n in (3, 10, 20)]
    rows = [0, 1, 3]  # row 2 stays empty
    eng.feed(rows, prompts)
    limits = [6, 2, 9]  # row 1 finishes first; its row keeps running in the static step
    outs = eng.generate(rows, limits, temperature=0)
    seqs = []
    for p, n, g in zip(prompts, limits, outs):
        assert g.tokens == uncached_greedy(model, p, n)
        assert_logprobs_of_full_forward(model, p, g)
        seqs.append(p + g.tokens)
    # the next turn: a chunk (a tool response) for two rows, fed eagerly, then static decoding again
    chunk = rand_ids(5, seed=99)
    eng.feed([1, 3], [chunk, chunk])
    outs = eng.generate([1, 3], 4, temperature=0)
    for s, g in zip((seqs[1], seqs[2]), outs):
        assert g.tokens == uncached_greedy(model, s + chunk, 4)
        assert_logprobs_of_full_forward(model, s + chunk, g)
    assert max(eng.pos) == 37 and eng.cap == (64 if block == 32 else 40)  # the view grew as the rows did
    # one compile for both capacities (0 when an earlier test compiled the step for this model already)
    assert counters["stats"]["unique_graphs"] - graphs <= (1 if compile else 0)


# The static decode step (all rows, compiled on CUDA) against the eager path when sampling, from the same seed: both
# draw one uniform per live row per step, so they sample the same tokens. At temperature 1 with per-row limits, a stop
# id, a row that fills the cache, an empty row and two turns; the log-probs also against the full forward.
@pytest.mark.parametrize("device,compile", [
    ("cpu", False), ("cpu", True),
    pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_static_step_samples_what_the_eager_path_samples(qwen3, tiny_qwen3, device, compile):
    model = qwen3 if device == "cpu" else from_pretrained(tiny_qwen3[0], device=device)
    prompts = [rand_ids(n, seed=300 + n) for n in (3, 10, 20, 38)]
    rows, limits = [0, 1, 3, 4], [12, 4, 9, 30]  # row 2 stays empty; row 4 (38 + 30 > 48) fills the cache
    chunk = rand_ids(4, seed=301)

    def run(eng, stop_ids):
        gen = torch.Generator(device).manual_seed(7)
        eng.feed(rows, prompts)
        first = eng.generate(rows, limits, temperature=1.0, stop_ids=stop_ids, generator=gen)
        eng.feed([0, 1], [chunk, chunk])  # the second turn: a tool response for two rows, then top-k sampling
        second = eng.generate([0, 1], 6, temperature=0.7, top_k=20, stop_ids=stop_ids, generator=gen)
        return first, second, list(eng.pos), [list(p) for p in eng.pending]

    host = Engine(model, batch_size=5, max_len=48, block=8, static=False)
    stop = run(host, ())[0][0].tokens[5]  # a token row 0 samples: with it as a stop id, row 0 stops early
    ref = run(Engine(model, batch_size=5, max_len=48, block=8, static=False), [stop])
    eng = Engine(model, batch_size=5, max_len=48, block=8, static=True, compile=compile)
    got = run(eng, [stop])
    reasons = [g.stop for g in ref[0]]
    assert reasons[0] == "stop" and reasons[3] == "max_len" and "length" in reasons
    assert len(ref[0][3].tokens) == 48 + 1 - 38
    for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
        assert (a.tokens, a.stop) == (b.tokens, b.stop)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-4
    assert ref[2:] == got[2:]  # positions and pending tokens
    for p, g in zip(prompts, got[0]):  # each sampled token's log-prob under softmax(logits / 1.0)
        assert_logprobs_of_full_forward(model, p, g)


def test_fork_and_first_token_diversity(qwen3):
    """Prefill once, fork into G rows; each row samples its own first token (a broadcast bug gives one token)."""
    prompt = rand_ids(12, seed=3)
    eng = Engine(qwen3, batch_size=16, max_len=64)
    eng.feed([0], [prompt])
    eng.fork(0, list(range(1, 16)))
    outs = eng.generate(range(16), 3, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert len({o.tokens[0] for o in outs}) > 4
    # every row continued from the same prompt: its logprobs are those of the full forward at temperature 5
    for o in outs[:4]:
        ref = torch.log_softmax(full_logits(qwen3, prompt + o.tokens[:2]) / 5.0, -1)
        for j in range(2):
            tok = o.tokens[j]
            assert math.isclose(o.logprobs[j], ref[len(prompt) - 1 + j, tok].item(), abs_tol=1e-4)


def test_seeded_sampling_is_reproducible(qwen3):
    prompt = [rand_ids(8, seed=5)] * 3
    a = generate_batch(qwen3, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(42))
    b = generate_batch(qwen3, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(42))
    assert [g.tokens for g in a] == [g.tokens for g in b]


def test_stop_ids_and_pending_token(qwen3):
    """A row that samples a stop id stops; that token is fed in front of the row's next chunk."""
    prompt = rand_ids(6, seed=11)
    greedy = generate_batch(qwen3, [prompt], 8, temperature=0)[0].tokens
    stop = greedy[3]
    eng = Engine(qwen3, batch_size=2, max_len=64)
    eng.feed([0, 1], [prompt, prompt])
    outs = eng.generate([0, 1], 8, temperature=0, stop_ids=[stop])
    first = greedy.index(stop)
    assert outs[0].tokens == greedy[: first + 1] and outs[0].stop == "stop"
    assert eng.pos[0] == len(prompt) + first  # the stop token is pending, not yet in the cache
    nxt = rand_ids(5, seed=12)
    logits = eng.feed([0], [nxt])
    ref = full_logits(qwen3, prompt + greedy[: first + 1] + nxt)[-1]
    assert (logits[0] - ref).abs().max().item() <= 1e-4


def test_max_len_is_reported(qwen3):
    eng = Engine(qwen3, batch_size=1, max_len=12)
    eng.feed([0], [rand_ids(8)])
    out = eng.generate([0], 20, temperature=0)[0]
    assert out.stop == "max_len" and len(out.tokens) == 5
    with pytest.raises(ValueError, match="exceed max_len 12"):
        eng.feed([0], [rand_ids(3)])


def test_memory_is_computed_up_front(qwen3):
    c = qwen3.config
    expect = 2 * c.num_hidden_layers * 4 * c.num_key_value_heads * 101 * c.head_dim * 2 + 4 * c.vocab_size * 4
    assert Engine.cache_bytes(c, 4, 100, torch.bfloat16) == expect
    eng = Engine(qwen3, batch_size=4, max_len=100)  # an fp32 model
    assert sum(t.numel() * 4 for t in eng.k_store + eng.v_store) + eng.last_logits.numel() * 4 == Engine.cache_bytes(c, 4, 100, torch.float32)
    assert "KV cache" in eng.memory_report()


def test_filter_logits_keeps_the_given_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    finite = lambda x: torch.isfinite(x[0]).tolist()  # noqa: E731
    assert finite(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert finite(filter_logits(logits, top_k=2, keep=torch.tensor([3]))) == [True, True, False, True]
    # top-p 0.7: the mass before each token is 0, .5, .8, .95, so tokens 2 and 3 go
    assert finite(filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert finite(filter_logits(logits, top_p=0.7, keep=torch.tensor([2]))) == [True, True, True, False]


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (0, 0.9), (0, 0.99), (5, 1.0), (40, 1.0), (10, 0.8), (3, 0.3)])
def test_filter_logits_keeps_the_set_transformers_keeps(top_k, top_p):
    """The tokens left by top-k then top-p equal those transformers' TopKLogitsWarper then TopPLogitsWarper leave (the
    order of generate's warpers), on random logits of varied sharpness (continuous, so no ties at the edge)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    logits = torch.randn(16, 200, generator=g) * torch.linspace(0.3, 6.0, 16)[:, None]  # flat rows to peaked ones
    ref = logits
    if top_k > 0:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert 0 < torch.isfinite(ours).sum() < logits.numel()  # some tokens kept and some dropped
    assert torch.equal(ours[torch.isfinite(ours)], logits[torch.isfinite(ours)])  # the kept ones unchanged


def test_sampling_filters_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    # top-k 2 renormalizes {0.5, 0.3} -> {0.625, 0.375}
    for _ in range(20):
        tok, lp = sample(logits, 1.0, top_k=2, generator=g)
        assert tok.item() in (0, 1)
        assert math.isclose(lp.item(), math.log([0.625, 0.375][tok.item()]), abs_tol=1e-5)
    # top-p 0.7 keeps 0.5 and 0.3 (0.5 < 0.7, then 0.8 >= 0.7 stops), drops the rest
    for _ in range(20):
        tok, lp = sample(logits, 1.0, top_p=0.7, generator=g)
        assert tok.item() in (0, 1)
        assert math.isclose(lp.item(), math.log([0.625, 0.375][tok.item()]), abs_tol=1e-5)
    # temperature 0.5 squares and renormalizes the probabilities
    p2 = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    tok, lp = sample(logits, 0.5, generator=g)
    assert math.isclose(lp.item(), math.log(p2[tok.item()] / p2.sum()), abs_tol=1e-5)
    tok, lp = sample(logits, 0.0)
    assert tok.item() == 0 and math.isclose(lp.item(), math.log(0.5), abs_tol=1e-6)


def test_sampling_frequencies_follow_the_distribution():
    """20,000 draws from [0.5, 0.3, 0.15, 0.05] (and top-k 3 of it): every frequency within 4.5 standard errors."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(1)
    for top_k, want in ((0, p), (3, p[:3] / p[:3].sum())):
        n = 20000
        tok, _ = sample(p.log().expand(n, 4).contiguous(), 1.0, top_k=top_k, generator=g)
        freq = torch.bincount(tok, minlength=4).double() / n
        want = torch.cat([want, torch.zeros(4 - len(want))]).double()
        se = (want * (1 - want) / n).sqrt()
        assert ((freq - want).abs() <= 4.5 * se + 1e-12).all(), (freq, want)


def test_greedy_equals_transformers_generate_on_default_model(default_model):
    from transformers import AutoModelForCausalLM
    model, tok = default_model
    hf = AutoModelForCausalLM.from_pretrained(model.source_dir, dtype=torch.float32).eval()
    questions = ["What is the capital of France?", "Write a SQL query that lists all tables in a SQLite database.",
                 "Revenue was 120 in 2022 and 150 in 2023. What is the percent change?"]
    prompts = [tok.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    ours = generate_batch(model, prompts, max_new_tokens=24, temperature=0)  # one ragged batch
    for p, g in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.im_end)[0, len(p):].tolist()
        assert g.tokens == ref, (tok.decode(g.tokens), tok.decode(ref))


@contextlib.contextmanager
def block_forward(monkeypatch):
    """The engine's feeds through Block.forward (Engine.onednn reads False) for the duration, not forward_onednn."""
    with monkeypatch.context() as mp:
        mp.setattr(Engine, "onednn", property(lambda self: False))
        yield


def add_same_nonzero_lora(model):
    """Rank-4 adapters drawn from seed 0 (the same on every model of one shape), B made nonzero so they matter."""
    torch.manual_seed(0)
    add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, Linear) and mod.lora_B is not None:
                mod.lora_B.normal_(0, 0.05)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's bf16 requirements are x86's")
def test_bf16_fast_agrees_with_onednn(tiny_qwen3):
    """bf16_fast (the bf16 defaults of train_grpo, eval and the engine's oneDNN packing) is true exactly where oneDNN
    reorders bf16 weights: an AVX2-only CPU gets fp32 defaults and a plain layout instead of a crash at start-up."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.randn(32, 32).bfloat16(), 16)
        onednn_ok = True
    except RuntimeError as e:
        assert "bf16 path needs the cpu support" in str(e)
        onednn_ok = False
    assert bf16_fast("cpu") == onednn_ok
    assert default_dtype("cpu") == ("bfloat16" if onednn_ok else "float32")
    engine = Engine(from_pretrained(tiny_qwen3[0], dtype=torch.bfloat16), 1, 8, pack=True)  # no crash where it failed
    assert (engine.model.lm_head.packed.layout == "onednn") == onednn_ok


def test_packed_bf16_weights_match_plain_and_follow_updates(tiny_qwen3, monkeypatch):
    """CPU bf16 decoding reorders weights into oneDNN's layout; results must equal the plain matmul, and an
    in-place weight update (an optimizer step) must be picked up, not served stale. The packs' matmuls equal the
    plain ones bit for bit (checked through Block.forward). Where oneDNN runs bf16 (AVX-512, AMX) the engine's feeds
    take Block.forward_onednn, whose residual adds are done inside the matmuls: x + W y is rounded to bf16 once where
    the plain path rounds W y and then the sum, so there the logits agree to bf16 precision (~1% of their range on
    this model), not bit for bit."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not available in this torch build")
    prompts = [rand_ids(n, seed=n) for n in (7, 3)]
    plain = from_pretrained(tiny_qwen3[0], dtype=torch.bfloat16)
    packed = from_pretrained(tiny_qwen3[0], dtype=torch.bfloat16)
    e_plain, e_packed = Engine(plain, 2, 40, pack=False), Engine(packed, 2, 40, pack=True)
    assert packed.lm_head.packed is not None and plain.lm_head.packed is None

    def feeds():
        e_plain.reset(), e_packed.reset()
        return e_plain.feed([0, 1], prompts), e_packed.feed([0, 1], prompts)

    def within(a, b, tol):
        return (a - b).abs().max().item() <= tol * a.abs().max().item()

    before = feeds()
    assert within(*before, 2e-2)
    with block_forward(monkeypatch):  # the same packs, no residual add fused
        assert torch.equal(*feeds())
        a = e_plain.generate([0, 1], 6, temperature=0)
        b = e_packed.generate([0, 1], 6, temperature=0)
        assert [g.tokens for g in a] == [g.tokens for g in b]
    with torch.no_grad():
        for m in (plain, packed):
            m.model.layers[0].mlp.down_proj.weight.mul_(-1.5)
            m.model.layers[1].self_attn.k_proj.weight.mul_(0.5)
    after = feeds()
    # the update moved the logits by far more than the tolerance, so packs served stale would fail the first check
    assert within(*after, 2e-2) and not within(after[0], before[0], 0.1)
    with block_forward(monkeypatch):
        assert torch.equal(*feeds())
    # LoRA adapters are merged into the packed weights: bf16 rounds W + scale * B A once, so the logits agree to
    # bf16 precision (~2-3%), not bit for bit
    for m in (plain, packed):
        add_same_nonzero_lora(m)
    assert within(*feeds(), 3e-2)
    # an optimizer step on the adapters re-merges; disabled adapters give the base, not the merged weights
    with torch.no_grad():
        for m in (plain, packed):
            m.model.layers[0].self_attn.q_proj.lora_B.mul_(3.0)
    a, b = feeds()
    assert within(a, b, 3e-2)
    with adapters_disabled(plain), adapters_disabled(packed):
        base_plain, base_packed = feeds()
    assert torch.equal(base_plain, base_packed) and (base_plain - a).abs().max().item() > 1e-2


# An engine's KV cache is the largest allocation of a run (36 GiB for the README's 4B command). `del engine` must free
# it at once, not when the garbage collector next runs: the static step once held a method bound to the engine (a
# reference cycle), and on an H200 a second engine's peak memory included the first one's cache. The collector is off
# here, so only reference counting can free it. On CUDA, compiled: the CUDA graph must not keep the cache either.
@pytest.mark.parametrize("device,compile", [
    ("cpu", False),
    pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_a_deleted_engine_frees_its_cache(tiny_qwen3, device, compile):
    import gc
    import weakref
    model = from_pretrained(tiny_qwen3[0], device=device)
    gc.collect()
    gc.disable()
    try:
        eng = Engine(model, batch_size=2, max_len=64, block=32, static=True, compile=compile)
        eng.feed([0, 1], [rand_ids(5, seed=1), rand_ids(3, seed=2)])
        assert len(eng.generate([0, 1], 3, temperature=0)[0].tokens) == 3  # the static step ran
        alive = [weakref.ref(eng), weakref.ref(eng.k[0]), weakref.ref(eng.v[-1])]
        del eng
        assert [r() is None for r in alive] == [True, True, True]
    finally:
        gc.enable()


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_plain_packs_merge_lora_and_follow_updates_in_the_compiled_step(tiny_qwen3, device):
    """The CUDA form of packed weights (one plain tensor for q/k/v and one for gate/up, LoRA adapters merged in),
    read by the compiled static decode step: fp32 greedy tokens and log-probs equal those of the same model without
    packs (adapters applied as separate matmuls). After an in-place update of one adapter (an optimizer step) the
    compiled step reads the re-merged weights (the outputs change exactly as the unpacked model's do) without
    compiling again: the packs are rewritten in place, at the address the graph holds."""
    from torch._dynamo.utils import counters
    models = [from_pretrained(tiny_qwen3[0], device=device) for _ in range(2)]
    for m in models:
        add_same_nonzero_lora(m)
    pack_weights(models[1], "plain")
    engines = [Engine(m, 3, 48, block=16, static=True, compile=True, pack=False) for m in models]
    assert models[0].lm_head.packed is None and models[1].model.layers[0].self_attn.packed_qkv.layout == "plain"
    prompts = [rand_ids(n, seed=900 + n) for n in (4, 9, 15)]

    def run(eng):
        eng.reset()
        eng.feed([0, 1, 2], prompts)
        return eng.generate([0, 1, 2], 10, temperature=0)

    def same(a, b):
        assert [g.tokens for g in a] == [g.tokens for g in b]
        assert max(abs(x - y) for ga, gb in zip(a, b) for x, y in zip(ga.logprobs, gb.logprobs)) <= 1e-4

    before = [run(e) for e in engines]
    same(*before)
    graphs = counters["stats"]["unique_graphs"]
    addresses = [p.w.data_ptr() for p in packs(models[1])]
    with torch.no_grad():
        for m in models:
            m.model.layers[0].self_attn.q_proj.lora_B.mul_(20.0)
            m.model.layers[1].mlp.up_proj.lora_B.mul_(20.0)
    after = [run(e) for e in engines]
    same(*after)
    assert [g.logprobs for g in after[1]] != [g.logprobs for g in before[1]]  # the update reached the packed step
    assert counters["stats"]["unique_graphs"] == graphs
    assert [p.w.data_ptr() for p in packs(models[1])] == addresses  # rewritten in place: a CUDA graph reads them there
