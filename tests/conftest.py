"""Shared fixtures: tiny random HF checkpoints written by transformers itself, the default model, shared data."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
QWEN3_TOKENIZER = os.path.join(SHARED, "qwen3-tokenizer")
TATQA_DEV = os.path.join(SHARED, "tatqa", "tatqa_dataset_dev.json")

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = {
    # head_dim 32 != hidden 64 / 4 heads, untied lm_head, q/k norm
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=False, rope_theta=1e6,
                  rms_norm_eps=1e-6, max_position_embeddings=512),
    # qkv bias, tied embeddings
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                  max_position_embeddings=512),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True, rope_theta=1e5, rms_norm_eps=1e-5,
                  max_position_embeddings=512),
}


def make_hf_model(kind, path, seed=0):
    """A transformers model with random weights, saved as sharded safetensors (small shards force an index)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = dict(TINY[kind])
    mt = cfg.pop("model_type")
    config = AutoConfig.for_model(mt, **cfg)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases, so a missed or misplaced one shows in the logits
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf.save_pretrained(path, max_shard_size="100KB")
    return hf


@pytest.fixture(scope="session", params=list(TINY))
def tiny(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"tiny_{request.param}"))
    hf = make_hf_model(request.param, path)
    return request.param, path, hf


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_qwen3_only"))
    return path, make_hf_model("qwen3", path)


@pytest.fixture(scope="session")
def default_model():
    from model import from_pretrained, load_tokenizer
    return from_pretrained("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir():
    if not os.path.exists(os.path.join(QWEN3_TOKENIZER, "tokenizer.json")):
        pytest.skip(f"needs the real Qwen3 tokenizer at {QWEN3_TOKENIZER} (../shared/data is absent)")
    return QWEN3_TOKENIZER
