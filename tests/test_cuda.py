"""CUDA-only checks (each skips without a GPU; CI has none, so bench/gpu_check.sh runs them on a lent GPU): the eager
engine path, the trainer's log-probs and gradients against the CPU, and the bf16 compiled engine's sampled log-probs
against the trainer's, which is the mismatch the truncated importance weight covers."""
import pytest
import torch

from model import Engine, from_pretrained
from test_engine import assert_logprobs_of_full_forward, rand_ids, uncached_greedy
from train_grpo import shared_prefix_len, token_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_eager_engine_on_cuda_rows_of_different_lengths_with_gaps(tiny_qwen3):
    """static=False on CUDA: the feed path's masks, range reads and gathers on the GPU, fp32, against uncached greedy
    decoding of each row alone."""
    model = from_pretrained(tiny_qwen3[0], device="cuda")
    limits = [12, 1, 1, 1, 1, 1, 1, 1, 1, 12]  # rows 0 and 9 outlive the others: the gather path
    prompts = [rand_ids(3 + 2 * i, seed=500 + i) for i in range(len(limits))]
    eng = Engine(model, batch_size=len(limits), max_len=64, block=8, static=False)
    eng.feed(list(range(len(limits))), prompts)
    outs = eng.generate(range(len(limits)), limits, temperature=0)
    for p, n, g in zip(prompts, limits, outs):
        assert g.tokens == uncached_greedy(model, p, n)
        assert_logprobs_of_full_forward(model, p, g)


def test_trainer_logprobs_and_grads_on_cuda_equal_cpu(tiny_qwen3):
    """token_logprobs with a shared prefix, in fp32: the same log-probs, entropies and gradients on both devices."""
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 512, (9,), generator=g)
    ids = torch.stack([torch.cat([prefix, torch.randint(0, 512, (7,), generator=g)]) for _ in range(3)])  # (3, 16)
    mask = torch.zeros(3, 15)
    mask[:, 4:] = 1
    assert shared_prefix_len(ids[:, :-1]) == 9
    weight = torch.linspace(-1, 1, 15)[None] * torch.tensor([[1.0], [-2.0], [0.5]])
    outs = []
    for dev in ("cpu", "cuda"):
        model = from_pretrained(tiny_qwen3[0], device=dev)
        lp, ent = token_logprobs(model, ids.to(dev), mask.to(dev), 0.8, chunk=5)
        (lp * weight.to(dev)).sum().backward()
        outs.append((lp.detach().cpu(), ent.cpu(), [p.grad.cpu() for p in model.parameters()]))
    (a, ea, ga), (b, eb, gb) = outs
    assert (a - b).abs().max().item() < 1e-4 and (ea - eb).abs().max().item() < 1e-4
    for x, y in zip(ga, gb):
        assert (x - y).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item())


def test_compiled_bf16_engine_logprobs_match_the_trainer(tiny_qwen3):
    """CUDA's defaults: bf16 weights, static decode step under torch.compile with CUDA graphs. Sampling is
    reproducible from a seeded CUDA generator, and each sampled token's log-prob is the trainer's (bf16 autocast) up to
    bf16 rounding: the engine/trainer mismatch the truncated importance weight is there for."""
    model = from_pretrained(tiny_qwen3[0], dtype=torch.bfloat16, device="cuda")
    prompts = [rand_ids(n, seed=700 + n) for n in (5, 17, 30, 11)]
    runs = []
    for _ in range(2):
        eng = Engine(model, batch_size=4, max_len=96, block=16)
        assert eng.static and eng.compile
        eng.feed(list(range(4)), prompts)
        runs.append(eng.generate(range(4), 40, temperature=1.0, generator=torch.Generator("cuda").manual_seed(3)))
    assert [o.tokens for o in runs[0]] == [o.tokens for o in runs[1]]
    diffs = []
    for p, o in zip(prompts, runs[0]):
        ids = torch.tensor([p + o.tokens], device="cuda")
        mask = torch.zeros(1, ids.shape[1] - 1, device="cuda")
        mask[0, len(p) - 1:] = 1
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            lp, _ = token_logprobs(model, ids, mask, 1.0)
        diffs.append(lp[0, len(p) - 1:].float().cpu() - torch.tensor(o.logprobs))
    d = torch.cat(diffs).abs()
    assert d.mean().item() < 0.02 and d.max().item() < 0.15, (d.mean().item(), d.max().item())
