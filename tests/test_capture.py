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


NSA_SMALL = NSA(block=16, top_n=3, window=16, cmp_block=16, cmp_stride=8, init_blocks=1, local_blocks=1)


def _selection_mask(block_idx, block, window, t):
    """Brute force: bool [HKV, T, T] of the keys a query sees under selected blocks (and a window)."""
    qpos, kpos = torch.arange(t)[:, None], torch.arange(t)[None, :]
    sel = torch.zeros(block_idx.shape[0], t, t, dtype=torch.bool)
    for h in range(block_idx.shape[0]):
        for i in range(t):
            for s_ in block_idx[h, i].tolist():
                if s_ >= 0:
                    sel[h, i, s_ * block:(s_ + 1) * block] = True
    sel &= kpos <= qpos
    return sel | ((qpos - kpos >= 0) & (qpos - kpos < window)) if window else sel


@needs_nsa
def test_nsa_capture_selections_recall_and_maps_against_brute_force(tiny_llama):
    """Layer 0 sees the same inputs with or without NSA, so its dense probabilities (eager weights) are the
    oracle: recall = dense mass on selected ∪ window, recall_selected = on the selected blocks alone, and
    NSA's own rows are the dense rows renormalised over that union (same scores, smaller softmax)."""
    t = 96
    x = random_ids(1, t, seed=9)
    probs = _dense_probs(tiny_llama, x, 0)[0]  # [HQ, T, T]
    with torch.no_grad(), apply_pattern(tiny_llama, NSA_SMALL), capture(tiny_llama, block=16, rows=[40, -1]) as rec:
        tiny_llama(x)
    lr = rec.layers[0]
    assert set(lr.nsa) == {"block_idx", "block_count", "importance", "recall_selected"}
    idx = lr.nsa["block_idx"]
    assert idx.shape == (1, 2, t, 3) and idx.dtype == torch.int32
    assert lr.nsa["importance"].shape == (1, 2, t, 6) and lr.nsa["block_count"].shape == (1, 2, t)
    assert torch.equal(lr.nsa["block_count"], (idx >= 0).sum(-1).int())
    own = (torch.arange(t) // 16)[None, None, :, None]
    assert bool(((idx == 0).any(-1)).all()) and bool(((idx == own).any(-1)).all())  # forced: first and own block
    assert lr.nsa_params["top_n"] == 3 and lr.pattern.startswith("NSA(")
    vis = _selection_mask(idx[0], 16, 16, t).repeat_interleave(2, 0)  # per query head (GQA 2)
    sel_only = _selection_mask(idx[0], 16, 0, t).repeat_interleave(2, 0)
    torch.testing.assert_close(lr.recall[0].double(), (probs * vis).sum(-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lr.nsa["recall_selected"][0].double(), (probs * sel_only).sum(-1), atol=1e-5, rtol=1e-4)
    assert (lr.nsa["recall_selected"] <= lr.recall + 1e-6).all()
    renorm = probs * vis / (probs * vis).sum(-1, keepdim=True)
    torch.testing.assert_close(lr.pattern_rows[0].double(), renorm[:, [40, 95]], atol=1e-5, rtol=1e-4)
    block_mass = renorm.reshape(4, 6, 16, 6, 16).sum((2, 4))
    torch.testing.assert_close(lr.pattern_block_mass[0].double(), block_mass, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lr.pattern_distance_mass.sum(-1), torch.full((1, 4), float(t)), atol=1e-3, rtol=1e-4)
    stats = selection_stats(rec)
    assert len(stats) == 2 * 2 and set(stats.source) == {"pattern"}
    assert stats["forced_only"].between(0, 1).all() and stats["window_only"].between(0, 1).all()
    assert (stats["pick_entropy_norm"] >= 0).all() and (stats["pick_entropy_norm"] <= 1 + 1e-9).all()
    assert (stats["mean_block_count"] <= 3).all() and (stats["recall_selected"] <= stats["recall"] + 1e-9).all()


@needs_nsa
@pytest.mark.parametrize("nsa", [NSA(block=16, top_n=3, window=20, cmp_block=16, cmp_stride=8, init_blocks=1,
                                     local_blocks=1, granularity="block"),
                                 NSA(block=32, top_n=2, window=8, cmp_block=16, cmp_stride=8, init_blocks=1,
                                     local_blocks=1)], ids=["block-granularity-window20", "window-inside-block"])
def test_compare_nsa_variants_equal_applying_them(tiny_llama, nsa):
    """The compare path computes NSA's selection without its attention and its recall from the dense
    probabilities: the same selection and recall as running that NSA, and the brute-force mass on the
    selected blocks, for a window that is not a multiple of the block and one shorter than a block."""
    t = 90
    x = random_ids(1, t, seed=5)
    probs = _dense_probs(tiny_llama, x, 0)[0]
    with torch.no_grad(), capture(tiny_llama, layers=[0], compare=[nsa]) as cmp:
        tiny_llama(x)
    with torch.no_grad(), apply_pattern(tiny_llama, nsa), capture(tiny_llama, layers=[0]) as own:
        tiny_llama(x)
    got = cmp.layers[0].compare_nsa[nsa.label]
    assert torch.equal(got["block_idx"], own.layers[0].nsa["block_idx"])
    torch.testing.assert_close(got["importance"], own.layers[0].nsa["importance"])
    torch.testing.assert_close(cmp.layers[0].compare_recall[nsa.label], own.layers[0].recall, atol=1e-5, rtol=1e-5)
    idx = got["block_idx"][0]
    vis = _selection_mask(idx, nsa.block, nsa.window, t).repeat_interleave(2, 0)
    sel_only = _selection_mask(idx, nsa.block, 0, t).repeat_interleave(2, 0)
    torch.testing.assert_close(cmp.layers[0].compare_recall[nsa.label][0].double(), (probs * vis).sum(-1),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["recall_selected"][0].double(), (probs * sel_only).sum(-1), atol=1e-5, rtol=1e-4)


def _brute_stats(q, k, scale, causal=True, layout=None):
    """float64 probabilities [B, HQ, Tq, Tk] and LSE of q on k (GQA by repetition), brute force."""
    b, tq, hq, _ = q.shape
    tk, g = k.shape[1], hq // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(g, 2)) * scale
    if layout is not None:
        m = layout.token_mask()
        m = m.repeat_interleave(g, 1) if m.shape[1] > 1 else m
    else:
        qp, kp = torch.arange(tq)[:, None] + tk - tq, torch.arange(tk)[None, :]
        m = kp <= qp if causal else torch.ones(tq, tk, dtype=torch.bool)
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]).nan_to_num(0.0), lse


@pytest.mark.parametrize("case", ["causal", "decode-offset", "bidirectional", "layout", "odd-lengths"])
def test_attention_mass_stats_against_brute_force(case):
    """Every reduction of the one blockwise pass (block mass, mass by distance, LSE, rows, mass by key block
    per query, mass on per-query key ranges), with chunks of one query block and of the whole input."""
    import math

    from nsa_viz.kernels.attention_stats import attention_mass_stats
    from nsa_viz.kernels.layout import TokenRule, layout_from_rule

    b, tq, tk, hq, hkv, blk = {"causal": (2, 128, 128, 4, 2, 32), "decode-offset": (1, 70, 200, 4, 1, 16),
                               "bidirectional": (1, 100, 100, 2, 2, 16), "layout": (1, 96, 130, 4, 2, 32),
                               "odd-lengths": (1, 75, 75, 3, 3, 16)}[case]
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(b, tq, hq, 16, generator=g) * 2, torch.randn(b, tk, hkv, 16, generator=g) * 2
    causal = case != "bidirectional"
    layout = layout_from_rule(TokenRule(causal=True, window=20, sink=3), tq, tk, blk, blk) if case == "layout" else None
    P, lse = _brute_stats(q, k, 0.25, causal, layout)
    start = torch.randint(0, tk, (tq,), generator=g)
    stop = start + torch.randint(0, 40, (tq,), generator=g)
    off = tk - tq
    dist = torch.arange(tq)[:, None] + off - torch.arange(tk)[None, :] + (0 if causal else tk - 1)
    n = tk if causal else 2 * tk - 1
    ok = (dist >= 0) & (dist < n)
    by_dist = torch.zeros(b, hq, n, dtype=torch.float64).index_add_(2, dist[ok], P[:, :, ok])
    nqb, nkb = math.ceil(tq / blk), math.ceil(tk / blk)
    by_block = torch.nn.functional.pad(P, (0, nkb * blk - tk, 0, nqb * blk - tq)).view(b, hq, nqb, blk, nkb, blk)
    kpos = torch.arange(tk)[None, :]
    in_span = (P * ((kpos >= start[:, None]) & (kpos < stop[:, None]))).sum(-1)
    for chunk in (1, 2**30):
        st = attention_mass_stats(q, k, block=blk, scale=0.25, causal=causal, layout=layout, rows=[0, 5, tq - 1],
                                  row_blocks=[blk, 16, 64], spans={"s": (start, stop)}, chunk_bytes=chunk,
                                  max_bytes=max(chunk, 1))
        close = dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st["block_mass"].double(), by_block.sum((3, 5)), **close)
        torch.testing.assert_close(st["distance_mass"].double(), by_dist, **close)
        torch.testing.assert_close(st["lse"].double(), lse, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(st["rows"].double(), P[:, :, [0, 5, tq - 1]], **close)
        for bs in (blk, 16, 64):
            nb = math.ceil(tk / bs)
            per_block = torch.nn.functional.pad(P, (0, nb * bs - tk)).view(b, hq, tq, nb, bs).sum(-1)
            torch.testing.assert_close(st["row_block_mass"][bs].double(), per_block, **close)
        torch.testing.assert_close(st["span_mass"]["s"].double(), in_span, **close)


@needs_nsa
def test_compare_with_nsa_equals_applying_it(tiny_llama):
    """capture(compare=[NSA]) on a dense model gives, at layer 0 (same inputs), the selection and recall
    that applying that NSA gives; the budget estimate counts the compare selections."""
    x = random_ids(1, 80, seed=2)
    with torch.no_grad(), capture(tiny_llama, layers=[0], compare=[NSA_SMALL, SlidingWindow(16)]) as cmp:
        tiny_llama(x)
    with torch.no_grad(), apply_pattern(tiny_llama, NSA_SMALL), capture(tiny_llama, layers=[0]) as own:
        tiny_llama(x)
    got = cmp.layers[0].compare_nsa[NSA_SMALL.label]
    assert torch.equal(got["block_idx"], own.layers[0].nsa["block_idx"])
    torch.testing.assert_close(cmp.layers[0].compare_recall[NSA_SMALL.label], own.layers[0].recall)
    assert cmp.layers[0].pattern == "model" and cmp.meta["compare_nsa_params"][NSA_SMALL.label]["top_n"] == 3
    stats = selection_stats(cmp)
    assert list(stats.source.unique()) == [NSA_SMALL.label] and len(stats) == 2
    mine = selection_stats(own)
    for col in ("forced_only", "pick_entropy", "recall", "recall_selected"):
        assert stats[col].tolist() == pytest.approx(mine[col].tolist(), rel=1e-5)
    need = estimate_bytes(tiny_llama, 80, layers=[0], compare=[NSA_SMALL, SlidingWindow(16)])
    assert abs(cmp.nbytes() - need) <= 0.05 * need
    with pytest.raises(ValueError, match="twice"):
        with capture(tiny_llama, compare=[SlidingWindow(4), SlidingWindow(4)]):
            pass


def test_selection_stats_on_a_known_selection():
    """Hand-made picks (block 4, window 8, init 1, local 1, 32 queries = 8 blocks): the measures by hand."""
    from nsa_viz.capture import LayerRecord

    t, blk = 32, 4
    qb = torch.arange(t) // blk
    idx = torch.full((1, 1, t, 3), -1, dtype=torch.int32)
    idx[0, 0, :, 0] = 0
    idx[0, 0, :, 1] = qb.int()
    # group 0: rows 16.. also pick block 1 (far, outside the window); rows 8..15 pick the previous block
    idx[0, 0, 16:, 2] = 1
    idx[0, 0, 8:16, 2] = (qb[8:16] - 1).int()
    z = torch.zeros
    lr = LayerRecord(layer=0, pattern="NSA", block=blk, q_len=t, kv_len=t, q_offset=0, num_q_heads=1, num_kv_heads=1,
                     dense_block_mass=z(1, 1, 8, 8), dense_distance_mass=z(1, 1, t), recall=torch.ones(1, 1, t),
                     nsa={"block_idx": idx, "recall_selected": torch.full((1, 1, t), 0.5)},
                     nsa_params={"block": blk, "init_blocks": 1, "local_blocks": 1, "window": 8})
    st = selection_stats(Recording(layers={0: lr})).iloc[0]
    # rows with a choice: query block >= 2 (blocks 0 and own are forced) -> rows 8..31
    assert st.rows_with_choice == 24
    assert st.forced_only == 0.0  # rows 8..15 pick their previous block, rows 16.. block 1
    # past the window (rows 8..31): rows 8..15 pick block qb-1 whose start is within 8 tokens -> inside
    assert st.window_only == pytest.approx(8 / 24)
    # free picks: rows 8..15 one each (inside the window), rows 16..31 block 1 (outside) -> 8 of 24 inside
    assert st.picks_in_window == pytest.approx(8 / 24)
    # free picks: blocks 1 (rows 8..11 -> qb-1 = 1, and rows 16..31), 2 (rows 12..15)
    p = torch.tensor([20 / 24, 4 / 24])
    assert st.pick_entropy == pytest.approx(float(-(p * p.log2()).sum()))
    assert st.distinct_blocks == 2 and st.recall_selected == 0.5 and st.recall == 1.0
    assert st.mean_block_count == pytest.approx((8 * 2 + 24 * 3) / 32)


def test_selection_stats_outside_window():
    """select_outside_window (block 4, window 8, init 1): a row's candidates start <= p - 8, only block 0 is forced."""
    from nsa_viz.capture import LayerRecord

    t, blk = 32, 4
    pos = torch.arange(t)
    idx = torch.full((1, 1, t, 3), -1, dtype=torch.int32)
    idx[0, 0, 8:, 0] = 0                       # rows 8..: block 0 is a candidate, forced
    idx[0, 0, 12:, 1] = ((pos[12:] - 8) // blk).int()  # rows 12..: also the last candidate block
    z = torch.zeros
    lr = LayerRecord(layer=0, pattern="NSA", block=blk, q_len=t, kv_len=t, q_offset=0, num_q_heads=1, num_kv_heads=1,
                     dense_block_mass=z(1, 1, 8, 8), dense_distance_mass=z(1, 1, t), recall=torch.ones(1, 1, t),
                     nsa={"block_idx": idx}, nsa_params={"block": blk, "init_blocks": 1, "local_blocks": 1, "window": 8,
                                                         "select_outside_window": True})
    st = selection_stats(Recording(layers={0: lr})).iloc[0]
    assert st.rows_with_choice == 20  # rows 12..31 have two candidates or more
    assert st.forced_only == 0.0 and st.picks_in_window == 0.0 and st.window_only == 0.0
    assert st.mean_block_count == pytest.approx((4 * 1 + 20 * 2) / 32)
    # block granularity, window 10: a query block's candidates count from its first position (rows 12..15 have
    # (12 - 10) // 4 + 1 = 1 candidate: no choice), not from each row's own position (row 15 would have 2)
    params = dict(lr.nsa_params, window=10, granularity="block")
    idx_b = torch.full((1, 1, t, 3), -1, dtype=torch.int32)
    first = pos // blk * blk
    idx_b[0, 0, first >= 10, 0] = 0
    two = (first - 10) // blk >= 1
    idx_b[0, 0, two, 1] = ((first[two] - 10) // blk).int()
    lr_b = LayerRecord(**{**lr.__dict__, "nsa": {"block_idx": idx_b}, "nsa_params": params})
    st = selection_stats(Recording(layers={0: lr_b})).iloc[0]
    assert st.rows_with_choice == int(two.sum()) and st.forced_only == 0.0


@needs_nsa
def test_nsa_recording_save_load_and_budget(tiny_llama, tmp_path):
    x = random_ids(1, 64)
    with torch.no_grad(), apply_pattern(tiny_llama, {1: NSA_SMALL}):
        need = estimate_bytes(tiny_llama, 64, rows=1, compare=[NSA_SMALL])
        with capture(tiny_llama, rows=[-1], compare=[NSA_SMALL], budget_bytes=need - 1) as rec:
            with pytest.raises(CaptureBudgetError):
                tiny_llama(x)
        with capture(tiny_llama, rows=[-1], compare=[NSA_SMALL]) as rec:
            tiny_llama(x)
    assert abs(rec.nbytes() - need) <= 0.05 * need
    rec.save(tmp_path / "nsa.pt")
    back = Recording.load(tmp_path / "nsa.pt")
    assert back.layers[0].nsa is None and back.layers[0].pattern == "model"
    for name, t in rec.layers[1].nsa.items():
        assert torch.equal(back.layers[1].nsa[name], t)
    assert torch.equal(back.layers[0].compare_nsa[NSA_SMALL.label]["block_idx"],
                       rec.layers[0].compare_nsa[NSA_SMALL.label]["block_idx"])
    assert selection_stats(back).equals(selection_stats(rec))


@needs_nsa
def test_per_group_nsa_is_recorded_per_group(tiny_llama):
    x = random_ids(1, 64, seed=4)
    other = NSA(block=16, top_n=2, window=8, cmp_block=16, cmp_stride=8, init_blocks=1, local_blocks=1)
    with torch.no_grad(), apply_pattern(tiny_llama, {0: {1: NSA_SMALL}, 1: {0: other, 1: NSA_SMALL}}), \
            capture(tiny_llama) as rec:
        tiny_llama(x)
    lr = rec.layers[0]
    assert set(lr.nsa) == {"g1.block_idx", "g1.block_count", "g1.importance", "g1.recall_selected"}
    assert lr.nsa["g1.block_idx"].shape == (1, 1, 64, 3)
    torch.testing.assert_close(lr.recall[:, :2], torch.ones(1, 2, 64))  # group 0 dense
    assert rec.layers[1].nsa_params["g0"]["top_n"] == 2 and rec.layers[1].nsa_params["g1"]["top_n"] == 3
    assert int((rec.layers[1].nsa["g0.block_idx"] >= 0).sum(-1).max()) == 2
    stats = selection_stats(rec)
    assert stats[["layer", "kv_group"]].values.tolist() == [[0, 1], [1, 0], [1, 1]]
    assert stats.mean_block_count.iloc[1] <= 2 < stats.mean_block_count.iloc[2]
