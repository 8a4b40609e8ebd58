"""The transformer against transformers: logits, loading/saving, LoRA, the converted default model, bad input."""
import json
import os
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model

from model import (Linear, add_lora, adapters_disabled, adapters_loaded, convert_gguf, default_gguf_path,
                   default_model_dir, from_pretrained, save_pretrained)


def ids_for(vocab, B=3, T=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def test_logits_match_transformers(tiny):
    kind, path, hf = tiny
    assert any(f.endswith(".index.json") for f in os.listdir(path)), "fixture should be sharded"
    ours = from_pretrained(path)
    x = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, f"{kind}: max abs logit diff {diff}"


def test_config_shapes(tiny):
    kind, path, hf = tiny
    m = from_pretrained(path)
    c = m.config
    if kind == "qwen3":
        assert c.head_dim == 32 and c.head_dim != c.hidden_size // c.num_attention_heads
        assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    if kind in ("qwen2", "llama"):
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert c.qkv_bias == (kind == "qwen2") and c.qk_norm == (kind == "qwen3")


def test_save_pretrained_loads_in_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    kind, path, hf = tiny
    ours = from_pretrained(path)
    out = str(tmp_path / "saved")
    save_pretrained(ours, out, max_shard_bytes=50_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert not os.path.exists(out + ".tmp")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max().item() <= 1e-5


def test_bf16_close_to_fp32(tiny_qwen3):
    path, hf = tiny_qwen3
    x = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        a = from_pretrained(path, dtype=torch.bfloat16)(x).float()
        b = hf(x).logits
    assert (a - b).abs().max().item() < 0.1  # bf16 has ~3 significant digits


class OpCount(TorchDispatchMode):
    """Counts the calls of one aten op made while active."""

    def __init__(self, op):
        super().__init__()
        self.op, self.n = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func == self.op
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("prefix", [0, 6], ids=["whole", "shared_prefix"])
def test_gradient_checkpointing_same_grads_and_keeps_the_attention(tiny_qwen3, prefix, monkeypatch):
    """Checkpointed blocks give the loss and gradients of plain ones, through the whole-sequence forward and the
    shared-prefix one; on CPU the backward pass reruns no attention kernel (model.CKPT_KEEP keeps its outputs), where
    with nothing kept it reruns each one the forward ran."""
    path, hf = tiny_qwen3
    x = ids_for(hf.config.vocab_size)
    x[:, :prefix] = x[0, :prefix]  # the rows share their first tokens
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default

    def run(ckpt):
        m = from_pretrained(path)
        m.gradient_checkpointing = ckpt
        with OpCount(flash) as fwd:
            h = m.hidden(x, prefix_len=prefix)
            loss = sum(m.lm_head(t).logsumexp(-1).mean() for t in (h if prefix else (h,)))
        with OpCount(flash) as bwd:
            loss.backward()
        return loss.item(), {n: p.grad for n, p in m.named_parameters()}, fwd.n, bwd.n

    ref_loss, ref_grads, ref_fwd, ref_bwd = run(False)
    assert ref_fwd == hf.config.num_hidden_layers * (2 if prefix else 1) and ref_bwd == 0
    for keep in (model.CKPT_KEEP, []):
        monkeypatch.setattr(model, "CKPT_KEEP", keep)
        loss, grads, fwd, bwd = run(True)
        assert loss == ref_loss and fwd == ref_fwd
        assert bwd == (0 if keep else ref_fwd), f"attention kernels rerun in the backward pass with CKPT_KEEP={keep}"
        for n, g in ref_grads.items():
            assert torch.allclose(grads[n], g, atol=1e-6), n


# --- LoRA ---------------------------------------------------------------------------------------------------------


def test_lora_zero_init_disable_and_merge(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    kind, path, hf = tiny
    x = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(x).logits
        m = add_lora(from_pretrained(path), rank=4, alpha=8)
        assert (m(x) - ref).abs().max().item() <= 1e-4, "zero-initialized B must leave the logits unchanged"
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        for mod in m.modules():
            if isinstance(mod, Linear) and mod.lora_B is not None:
                mod.lora_B.normal_(0, 0.05)
        on = m(x)
        assert (on - ref).abs().max().item() > 1e-2, "trained adapters must change the logits"
        with adapters_disabled(m):
            assert (m(x) - ref).abs().max().item() <= 1e-4, "disabled adapters must give the base model"
        assert torch.equal(m(x), on), "adapters come back after the context"
        out = str(tmp_path / "merged")
        save_pretrained(m, out)
        assert (from_pretrained(out)(x) - on).abs().max().item() <= 1e-4
        assert (AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(x).logits - on).abs().max().item() <= 1e-4
        # another adapter state of the same base (a GRPO phase's KL reference: the warm start's adapters), loaded for
        # a pass and then undone exactly: the logits transformers gave for the saved state, then the new state's
        values = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}
        for mod in m.modules():
            if isinstance(mod, Linear) and mod.lora_B is not None:
                mod.lora_B.normal_(0, 0.05)
        on2 = m(x)
        with adapters_loaded(m, values):
            assert torch.equal(m(x), on)
        assert torch.equal(m(x), on2) and (on2 - on).abs().max().item() > 1e-2
        with pytest.raises(KeyError, match="lacks"):
            with adapters_loaded(m, {"model.layers.0.mlp.nope.lora_A": values[next(iter(values))]}):
                pass


def grads_of(loss, params):
    """{name: gradient of loss} for params {name: tensor}, leaving every .grad untouched (hf is shared)."""
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def assert_grads_match(ours, ref, tag):
    """Each gradient within 1e-4 of the reference's largest entry; no reference gradient is all zero."""
    for n, g in ref.items():
        assert g.abs().max() > 0, (tag, n)
        assert (ours[n] - g).abs().max().item() <= 1e-4 * g.abs().max().item() + 1e-6, (tag, n)


def test_lora_gradients_equal_transformers_with_the_merged_weight(tiny):
    """The adapters' gradients against transformers run with each adapted weight replaced by W + scale * B A, a
    function of the same A and B tensors: autograd through the merged weight in another implementation, not through
    Linear.add_lora_delta's GEMMs. With gradient checkpointing too, which replays the adapters in the backward pass."""
    kind, path, hf = tiny
    x = ids_for(hf.config.vocab_size)
    m = add_lora(from_pretrained(path), rank=4, alpha=12)  # scale 3, written out below, not read from the model
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, Linear) and mod.lora_B is not None:
                mod.lora_B.normal_(0, 0.05)
    params = dict(m.named_parameters())
    lora = {n: params[n] for n in params if "lora_" in n}
    merged = {n[: -len("lora_A")] + "weight": params[n[: -len("lora_A")] + "weight"] + 3.0 * params[n[:-1] + "B"] @ a
              for n, a in lora.items() if n.endswith("lora_A")}
    w = torch.randn(hf.config.vocab_size, generator=torch.Generator().manual_seed(2))  # every logit weighs in the loss
    ref = grads_of((torch.func.functional_call(hf, merged, (x,)).logits * w).sum(), lora)
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        assert_grads_match(grads_of((m(x) * w).sum(), lora), ref, (kind, ckpt))


def test_full_gradients_equal_transformers(tiny):
    """Full fine-tuning (--lora-rank 0): every parameter's gradient against transformers' backward pass, tied
    embeddings (qwen2, llama: the input and output uses summed into one tensor) and qkv biases included, with and
    without gradient checkpointing."""
    kind, path, hf = tiny
    x = ids_for(hf.config.vocab_size)
    w = torch.randn(hf.config.vocab_size, generator=torch.Generator().manual_seed(3))
    ref = grads_of((hf(x).logits * w).sum(), dict(hf.named_parameters()))
    m = from_pretrained(path)
    ours = dict(m.named_parameters())
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        assert_grads_match(grads_of((m(x) * w).sum(), ours), ref, (kind, ckpt))


def test_lora_bad_targets(tiny_qwen3):
    with pytest.raises(ValueError, match="matched no linear layer"):
        add_lora(from_pretrained(tiny_qwen3[0]), targets=("nope_proj",))


# --- the default model ----------------------------------------------------------------------------------------------


def test_default_model_matches_transformers_gguf(default_model):
    from transformers import AutoModelForCausalLM
    model, tok = default_model
    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                              dtype=torch.float32).eval()
    ids = tok.render([{"role": "user", "content": "List the tables, then query revenue for 2023."}], add_generation_prompt=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-3, diff


def test_default_tokenizer_matches_transformers_gguf(default_model):
    from transformers import AutoTokenizer
    _, tok = default_model
    gguf = default_gguf_path()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    texts = ["Hello world 12345", "<|im_start|>user\nWhat was revenue in FY2023?<|im_end|>\n",
             '<tool_call>\n{"name": "sql_query", "arguments": {"query": "SELECT y2023 FROM income_statement"}}\n</tool_call>',
             "  spaces\tand\nnewlines  ", "Unicode: € – 3.5% (1,234.5) naïve"]
    for t in texts:
        assert tok.encode(t) == ref.encode(t, add_special_tokens=False), t
        assert tok.decode(tok.encode(t)) == t


def test_default_model_dir_is_reused(default_model, tmp_path):
    out = convert_gguf(default_gguf_path(), str(tmp_path / "conv"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 3, 49152)
    assert os.path.samefile(default_model_dir(), default_model[0].source_dir)


# --- bad input -------------------------------------------------------------------------------------------------------


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained("/nonexistent/model")


def test_missing_config_and_weights(tiny_qwen3, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(str(d))
    shutil.copy(os.path.join(tiny_qwen3[0], "config.json"), d / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(str(d))


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_bad_configs(tiny_qwen3, tmp_path):
    src = tiny_qwen3[0]
    with pytest.raises(ValueError, match=r"config.json: missing required key.*hidden_size"):
        from_pretrained(_with_config(src, tmp_path / "a", hidden_size=None))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        from_pretrained(_with_config(src, tmp_path / "b", model_type="gpt2"))
    with pytest.raises(ValueError, match=r"tensor '[\w.]+' has shape \(512, 64\), config.json implies \(1024, 64\)"):
        from_pretrained(_with_config(src, tmp_path / "c", vocab_size=1024))
    with pytest.raises(ValueError, match="rope_scaling"):
        from_pretrained(_with_config(src, tmp_path / "d", rope_scaling={"rope_type": "yarn", "factor": 4.0}))
