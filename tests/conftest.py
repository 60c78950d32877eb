"""Shared fixtures: tiny random Llama-family models (fast tests) and the real SmolLM2 (slow tests).

``tiny_llama`` and friends are built from a config with random weights in a few milliseconds;
``smollm2`` loads the real SmolLM2-135M-Instruct once per test session (dequantising the GGUF takes
seconds) and is shared by every slow test that needs it: tests must leave it as they found it
(``remove_pattern`` / the ``apply_pattern`` context manager), which ``smollm2`` checks on teardown.
"""
from __future__ import annotations

import pytest
import torch


def tiny_config(kind: str = "llama", **overrides):
    """A 2-layer config with head_dim 32, 4 query and 2 key/value heads (GQA 2), vocabulary 128."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    common.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM in eval mode (float32, CPU), deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), attn_implementation="sdpa")
    return model.eval()


def random_ids(batch: int, length: int, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(params=["llama", "qwen2", "mistral"])
def tiny_family(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct in float32 on the CPU, loaded once."""
    from nsa_viz.models import ModelNotFoundError, load_model

    try:
        model, tok = load_model()
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    yield model, tok
    from nsa_viz.models import current_patterns

    assert not current_patterns(model), "a test left a pattern applied on the shared SmolLM2"


class CharTokenizer:
    """Tokenizer-free helper for tiny models: one id per byte modulo the vocabulary (128)."""

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        from types import SimpleNamespace

        ids = [b % self.vocab for b in text.encode("utf-8")]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def convert_ids_to_tokens(self, ids):
        return [chr(i) for i in ids]


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()
