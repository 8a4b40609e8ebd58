"""
Generation throughput: our KV-cache engine vs transformers' generate, same model, prompts, dtype, threads and
number of new tokens (EOS ignored); greedy by default, --temperature 1 samples as rollouts do. Times include the
prefill of the prompts on both sides. Where the engine packs its weights (the CPU), the table adds the floor: the
step's matmuls alone over every weight (weights_floor), the most tokens/s a step running these matmuls could reach
at that batch on this machine, and its ratio over transformers: the most such an engine could reach against it here.

    python bench/generate.py --model smollm2-135m --batch 16 --new-tokens 64 [--json]
    python bench/generate.py --context 1500 --batch 16 --new-tokens 32   # rows 1,500 tokens deep, as in rollouts
    python bench/generate.py --random-config qwen3-4b --device cuda --batch 1 16 64   # weights don't change speed
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.decode_depth import abba  # noqa: E402
from model import Engine, default_dtype, from_pretrained, load_tokenizer, packs, resolve_model_path  # noqa: E402

QWEN3_4B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=2560,
                intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, rms_norm_eps=1e-6, rope_theta=5e6, tie_word_embeddings=True, max_position_embeddings=40960)
CONFIGS = {"qwen3-4b": QWEN3_4B}

QUESTIONS = ["What was total revenue in fiscal 2023?", "List the tables in this database and describe each.",
             "Compute the year-over-year change in operating income between 2022 and 2023, in percent.",
             "Which segment had the largest share of revenue?", "What is the interest coverage ratio for 2021?",
             "How many employees did the company have at the end of 2022?"]


def random_model_dir(cfg, name, device):
    """A checkpoint of this shape with random bf16 weights (drawn on device: 4B values take minutes on a CPU), written
    once to the temp folder and reused by later runs (written under a temporary name, then renamed)."""
    from safetensors.torch import save_file
    d = os.path.join(tempfile.gettempdir(), f"tablerl_bench_{name}")
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return d
    tmp = d + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f)
    from model import ModelConfig, Transformer
    with torch.device("meta"):
        m = Transformer(ModelConfig.from_hf(cfg))
    g = torch.Generator(device).manual_seed(0)
    sd = {k: (torch.randn(v.shape, dtype=torch.bfloat16, device=device, generator=g) * 0.02).cpu()
          for k, v in m.state_dict().items() if not (k == "lm_head.weight" and cfg["tie_word_embeddings"])}
    save_file(sd, os.path.join(tmp, "model.safetensors"))
    os.replace(tmp, d)
    return d


def prompts_for(tok, batch, vocab, context=0):
    """Chat prompts of 39-57 tokens; with context > 0, each is grown at the front to context tokens (a rollout's rows
    are 1-2k tokens deep by their last turns, where attention costs more than at the start)."""
    g = torch.Generator().manual_seed(0)
    if tok is None:  # random model: random ids of chat-like lengths
        prompts = [torch.randint(0, vocab, (40 + 7 * (i % 6),), generator=g).tolist() for i in range(batch)]
    else:
        prompts = [tok.render([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], add_generation_prompt=True)
                   for i in range(batch)]
    filler = torch.randint(0, vocab, (max(context, 1),), generator=g).tolist()  # speed does not depend on the ids
    return [filler[: max(0, context - len(p))] + p for p in prompts]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(eng, prompts, new_tokens, device, temperature):
    eng.reset()
    sync(device)
    t = time.perf_counter()
    eng.feed(list(range(len(prompts))), prompts)
    outs = eng.generate(range(len(prompts)), new_tokens, temperature=temperature, generator=torch.Generator(device).manual_seed(0))
    sync(device)
    assert all(len(o.tokens) == new_tokens for o in outs)
    return time.perf_counter() - t


def run_hf(hf, prompts, new_tokens, device, pad_id, temperature):
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=device)  # left padding
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    sync(device)
    t = time.perf_counter()
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      eos_token_id=None, pad_token_id=pad_id, **sampling)
    sync(device)
    assert out.shape[1] == T + new_tokens
    return time.perf_counter() - t


def weights_floor(model, batch, device, repeats=5):
    """Seconds for the matmuls of one decode step alone: every packed weight (q/k/v, o, gate/up, down, lm_head; what
    the engine's step multiplies by) applied once to `batch` rows, best of repeats. A decode step reads all the weights
    once, and at these batch sizes on a CPU that read is the cost: ~270 MB of bf16 for SmolLM2-135M, which runs from
    memory, not cache. No decode step running these matmuls can be faster, whatever else it fuses or skips: batch /
    floor is its ceiling on tokens/s, and that ceiling over transformers' speed its best possible ratio here."""
    ps = packs(model)
    if not ps:
        return None
    xs = [torch.randn(batch, p.linears[0].in_features, dtype=model.dtype, device=device) for p in ps]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first pass warms oneDNN's kernels up
            sync(device)
            t = time.perf_counter()
            for p, x in zip(ps, xs):
                p(x)
            sync(device)
            best = min(best, time.perf_counter() - t)
    return best


def profile_totals(prof):
    """A finished torch.profiler run -> (us per CUDA kernel name, self CPU us per host op name, kernels launched, the
    GPU's idle time between consecutive kernels in us: (gaps under 20 us, gaps of 20 us or more)). The short gaps are
    the device's own launch latency between kernels queued back to back (inside a CUDA graph); the long ones are the
    device waiting for the host (a sync, the next launch)."""
    from collections import Counter

    from torch.autograd import DeviceType
    kern, host, n_kern, spans = Counter(), Counter(), 0, []
    for e in prof.events():
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            kern[e.name] += e.time_range.elapsed_us()
            n_kern += 1
            spans.append((e.time_range.start, e.time_range.end))
        else:
            host[e.name] += e.self_cpu_time_total
    spans.sort()
    short = long = 0.0
    for (_, end), (start, _) in zip(spans, spans[1:]):
        gap = max(0.0, start - end)
        short, long = (short + gap, long) if gap < 20 else (short, long + gap)
    return kern, host, n_kern, (short, long)


def profile_decode(eng, prompts, steps, device, top=10):
    """Where a decode step's time goes: steps greedy tokens for every row, first unprofiled (wall time per step), then
    under torch.profiler: GPU kernel time per step (what the device works), kernels per step, and the top kernels and
    host-side ops. Wall time minus kernel time is time the device waits for the host."""
    from torch.profiler import ProfilerActivity, profile
    rows = list(range(len(prompts)))

    def run():
        eng.reset()
        eng.feed(rows, prompts)
        eng.generate(rows, 2, temperature=0.0)  # the first token comes from the prefill's logits: start decoding
        sync(device)
        t = time.perf_counter()
        eng.generate(rows, steps, temperature=0.0)
        sync(device)
        return time.perf_counter() - t

    run()
    wall = run() / steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        run()
    kern, host, n_kern, (short, long) = profile_totals(prof)
    out = {"wall_ms_per_step": round(wall * 1e3, 3), "kernel_ms_per_step": round(sum(kern.values()) / steps / 1e3, 3),
           "kernels_per_step": round(n_kern / steps, 1),
           # under the profiler: the device idle between kernels queued back to back, and waiting for the host
           "gaps_under_20us_ms_per_step": round(short / steps / 1e3, 3),
           "gaps_over_20us_ms_per_step": round(long / steps / 1e3, 3),
           "top_kernels_ms_per_step": {k: round(v / steps / 1e3, 3) for k, v in kern.most_common(top)},
           "top_host_ops_ms_per_step": {k: round(v / steps / 1e3, 3) for k, v in host.most_common(top)}}
    print(f"profile, batch {len(prompts)}, {steps} steps: wall {out['wall_ms_per_step']} ms/step, kernels "
          f"{out['kernel_ms_per_step']} ms/step ({out['kernels_per_step']} per step); GPU idle between kernels "
          f"{out['gaps_under_20us_ms_per_step']} ms/step in gaps < 20 us, {out['gaps_over_20us_ms_per_step']} in longer "
          "gaps", file=sys.stderr)
    for what in ("top_kernels_ms_per_step", "top_host_ops_ms_per_step"):
        print(f"  {what}:", file=sys.stderr)
        for k, v in out[what].items():
            print(f"    {v:8.3f}  {k[:110]}", file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model name or HF directory")
    ap.add_argument("--random-config", choices=list(CONFIGS), help="time a randomly initialized model of this shape")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=0, help="grow every prompt to this many tokens (0: 39-57)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (top_k 0, top_p 1) as rollouts do")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="both sides' dtype (default: bfloat16 where bf16 is fast, model.bf16_fast, else float32)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=4, help="timed runs per side, alternating; the best is reported")
    ap.add_argument("--no-hf", action="store_true", help="time only our engine")
    ap.add_argument("--static-shapes", action="store_true",
                    help="compile the decode step once per cache capacity (the engine's dynamic=False), for an A/B")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile this many decode steps per batch: kernel time vs wall time, top kernels and ops")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.dtype = args.dtype or default_dtype(args.device)
    dtype = getattr(torch, args.dtype)
    path = random_model_dir(CONFIGS[args.random_config], args.random_config, args.device) if args.random_config else resolve_model_path(args.model)
    model = from_pretrained(path, dtype=dtype, device=args.device)
    tok = None if args.random_config else load_tokenizer(path)
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    rows = []
    for b in args.batch:
        prompts = prompts_for(tok, b, model.config.vocab_size, args.context)
        # one engine per batch size; the warm-up run goes as deep as the timed ones (on CUDA it compiles the decode
        # step once per cache capacity it reaches)
        eng = Engine(model, b, max(map(len, prompts)) + max(args.new_tokens, args.profile + 2) + 1,
                     dynamic=not args.static_shapes)
        warmup = run_ours(eng, prompts, args.new_tokens, args.device, args.temperature)  # on CUDA: + compiling
        # the two sides' timed runs alternate (ours, hf, hf, ours, ...), so that a slow spell of a shared machine
        # (this VM's speed moves by 10-30% within minutes) falls on both; each side reports its best run
        sides = {"ours": lambda: run_ours(eng, prompts, args.new_tokens, args.device, args.temperature)}
        if hf is not None:
            with torch.no_grad():
                run_hf(hf, prompts, 4, args.device, 0, args.temperature)
            sides["hf"] = lambda: run_hf(hf, prompts, args.new_tokens, args.device, 0, args.temperature)
        best = {k: float("inf") for k in sides}
        with torch.no_grad():
            for i in range(args.repeats):
                for k in abba(i, list(sides)):
                    best[k] = min(best[k], sides[k]())
        ours = best["ours"]
        row = {"batch": b, "ours_tok_s": round(b * args.new_tokens / ours, 1), "warmup_s": round(warmup, 1)}
        floor = weights_floor(model, b, args.device)
        if floor is not None:
            row["floor_tok_s"] = round(b / floor, 1)  # the weights' read alone: no decode step runs faster
        if hf is not None:
            t_hf = best["hf"]
            row["hf_tok_s"] = round(b * args.new_tokens / t_hf, 1)
            row["ratio"] = round(t_hf / ours, 2)
            if floor is not None:  # the ratio an engine whose step were its matmuls alone would reach
                row["floor_ratio"] = round(row["floor_tok_s"] / row["hf_tok_s"], 2)
        if args.device.startswith("cuda"):
            # decode reads every weight once per step: achieved bandwidth vs the card's peak
            wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
            row["weight_read_GB_s"] = round(wbytes * args.new_tokens / ours / 1e9, 1)
        if args.profile:
            row["profile"] = profile_decode(eng, prompts, args.profile, args.device)
        rows.append(row)
        if not args.json:
            print(row, file=sys.stderr, flush=True)
    conditions = {"model": args.random_config or args.model, "dtype": args.dtype, "device": args.device,
                  "threads": args.threads, "context": args.context or "39-57", "new_tokens": args.new_tokens,
                  "temperature": args.temperature, "eos_ignored": True,
                  "decode_compile": "per capacity" if args.static_shapes else "once (symbolic cache length)",
                  "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    if args.json:
        print(json.dumps({"conditions": conditions, "results": rows}, indent=2))
        return
    print("conditions: " + ", ".join(f"{k}={v}" for k, v in conditions.items()))
    # floor: the step's matmuls alone (weights_floor), a ceiling on any engine's tokens/s here; floor ratio: that
    # ceiling over transformers' speed
    print(f"{'batch':>6} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'floor tok/s':>12} {'floor ratio':>12}")
    for r in rows:
        print(f"{r['batch']:>6} {r['ours_tok_s']:>11} {r.get('hf_tok_s', '-'):>9} {r.get('ratio', '-'):>6} "
              f"{r.get('floor_tok_s', '-'):>12} {r.get('floor_ratio', '-'):>12}")


if __name__ == "__main__":
    main()
