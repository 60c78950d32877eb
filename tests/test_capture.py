"""capture(): shapes, sums, exact recall against brute force, budget refusal, save/load."""
from __future__ import annotations

import pytest
import torch

from nsa_viz.capture import (CaptureBudgetError, Recording, capture, estimate_bytes, recall_table, selection_stats)
from nsa_viz.models import apply_pattern, attention_modules, current_patterns
from nsa_viz.patterns import NSA, Dense, SlidingWindow

from .conftest import random_ids, tiny_model
from .test_attention import needs_nsa


def _dense_probs(model, x, layer):
    """Brute-force dense attention probabilities [B, HQ, T, T] of one layer, via eager attention weights."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(x, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return out.attentions[layer].double()


def test_capture_shapes_sums_and_tokens(tiny_llama):
    x = random_ids(2, 150)
    with torch.no_grad():
        ref = tiny_llama(x).logits
        with capture(tiny_llama, rows=[-1, 3], block=32) as rec:
            out = tiny_llama(x).logits
            tiny_llama(x)  # a second call is not recorded
    assert torch.equal(out, ref), "capture must not change the model's own outputs"
    assert tiny_llama.config._attn_implementation == "sdpa" and not current_patterns(tiny_llama)
    assert sorted(rec.layers) == [0, 1] and rec.ignored_calls == 1
    assert torch.equal(rec.tokens, x)
    lr = rec.layers[1]
    assert (lr.block, lr.q_len, lr.kv_len, lr.pattern) == (32, 150, 150, "model")
    assert lr.dense_block_mass.shape == (2, 4, 5, 5)
    assert lr.dense_distance_mass.shape == (2, 4, 150)
    rows_in_block = torch.tensor([32, 32, 32, 32, 22.0])
    torch.testing.assert_close(lr.dense_block_mass.sum(-1), rows_in_block.expand(2, 4, 5))
    torch.testing.assert_close(lr.dense_distance_mass.sum(-1), torch.full((2, 4), 150.0))
    assert torch.all(torch.triu(lr.dense_block_mass, diagonal=1) == 0)  # causal at block level
    assert lr.row_index.tolist() == [3, 149] and lr.dense_rows.shape == (2, 4, 2, 150)
    probs = _dense_probs(tiny_llama, x, 1)
    torch.testing.assert_close(lr.dense_rows.double(), probs[:, :, [3, 149]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lr.recall, torch.ones(2, 4, 150))
    assert lr.pattern_block_mass is None


def test_recall_equals_brute_force(tiny_llama):
    """recall = dense probability on the pattern's visible keys, per query; also for `compare` patterns."""
    x = random_ids(1, 120, seed=4)
    probs = _dense_probs(tiny_llama, x, 0)[0]  # [HQ, T, T]
    t = torch.arange(120)
    visible = ((t[:, None] - t[None, :]) >= 0) & ((t[:, None] - t[None, :]) < 10)
    expected = (probs * visible).sum(-1)  # [HQ, T]
    with torch.no_grad(), apply_pattern(tiny_llama, {0: SlidingWindow(10)}):
        with capture(tiny_llama, layers=[0], compare=[SlidingWindow(10)], rows=[-1]) as rec:
            tiny_llama(x)
    lr = rec.layers[0]
    assert sorted(rec.layers) == [0]
    torch.testing.assert_close(lr.recall[0].double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lr.compare_recall["SlidingWindow(window=10, causal=True)"][0].double(), expected,
                               atol=1e-5, rtol=1e-4)
    # the pattern's own maps: each query's mass stays inside the window, and still sums to 1 per query
    torch.testing.assert_close(lr.pattern_distance_mass.sum(-1), torch.full((1, 4), 120.0))
    assert lr.pattern_distance_mass[..., 10:].abs().max() == 0
    table = recall_table(rec)
    assert list(table.columns[:5]) == ["layer", "head", "kv_group", "pattern", "recall"]
    assert len(table) == 4 and table["recall"].between(0, 1).all()


def test_budget_is_refused_before_computing(tiny_llama):
    x = random_ids(1, 200)
    need = estimate_bytes(tiny_llama, 200, rows=2)
    assert need > 0
    with torch.no_grad(), capture(tiny_llama, rows=[0, 1], budget_bytes=need - 1) as rec:
        with pytest.raises(CaptureBudgetError, match="budget_bytes"):
            tiny_llama(x)
    assert rec.layers == {}
    with torch.no_grad(), capture(tiny_llama, rows=[0, 1], budget_bytes=need) as rec:
        tiny_llama(x)
    assert abs(rec.nbytes() - need) <= 0.05 * need
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="block"):
        with capture(tiny_llama, block=48):
            pass
    with pytest.raises(ValueError, match="budget_bytes"):
        with capture(tiny_llama, budget_bytes=0):
            pass
    with pytest.raises(ValueError, match="layers"):
        with capture(tiny_llama, layers=[7]):
            pass
    with pytest.raises(ValueError, match="rows"):
        with torch.no_grad(), capture(tiny_llama, rows=[50]):
            tiny_llama(random_ids(1, 20))
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_save_load_roundtrip_and_bad_files(tiny_llama, tmp_path):
    x = random_ids(1, 70)
    with torch.no_grad(), apply_pattern(tiny_llama, SlidingWindow(16)), capture(tiny_llama, rows=[-1]) as rec:
        tiny_llama(x)
    path = tmp_path / "rec.pt"
    rec.save(path)
    back = Recording.load(path)
    assert sorted(back.layers) == [0, 1] and torch.equal(back.tokens, x)
    for name in ("dense_block_mass", "dense_distance_mass", "pattern_block_mass", "recall", "dense_rows"):
        assert torch.equal(getattr(back.layers[1], name), getattr(rec.layers[1], name))
    assert back.layers[1].pattern == rec.layers[1].pattern and back.meta["block"] == 64

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable nsa_viz recording"):
        Recording.load(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="format tag"):
        Recording.load(foreign)
    future = tmp_path / "future.pt"
    torch.save({"format": "nsa_viz.recording", "version": 99, "layers": {}}, future)
    with pytest.raises(ValueError, match="version"):
        Recording.load(future)
    damaged = tmp_path / "damaged.pt"
    torch.save({"format": "nsa_viz.recording", "version": 1, "layers": {0: {"layer": 0}}}, damaged)
    with pytest.raises(ValueError, match="missing fields"):
        Recording.load(damaged)
    with pytest.raises(FileNotFoundError):
        Recording.load(tmp_path / "none.pt")


def test_generate_records_prefill_only(tiny_llama):
    x = random_ids(1, 40)
    with torch.no_grad(), capture(tiny_llama) as rec:
        tiny_llama.generate(x, max_new_tokens=3, do_sample=False)
    assert rec.layers[0].q_len == 40 and rec.ignored_calls == 2
    assert torch.equal(rec.tokens, x)


@needs_nsa
def test_nsa_capture_selections_and_stats(tiny_llama):
    pat = NSA(block=16, top_n=3, window=16, cmp_block=16, cmp_stride=8, init_blocks=1, local_blocks=1)
    x = random_ids(1, 96, seed=9)
    with torch.no_grad(), apply_pattern(tiny_llama, pat), capture(tiny_llama, block=16) as rec:
        tiny_llama(x)
    lr = rec.layers[0]
    assert lr.nsa is not None and "selected" in lr.nsa
    assert lr.recall.shape == (1, 4, 96) and bool(((lr.recall >= 0) & (lr.recall <= 1 + 1e-6)).all())
    torch.testing.assert_close(lr.pattern_distance_mass.sum(-1), torch.full((1, 4), 96.0), atol=1e-3, rtol=1e-4)
    stats = selection_stats(rec)
    assert len(stats) == 2 * 2 and stats["forced_only"].between(0, 1).all()
    assert (stats["pick_entropy_norm"] >= 0).all() and (stats["pick_entropy_norm"] <= 1 + 1e-9).all()
