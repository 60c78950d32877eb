"""Locality audit: its numbers against brute force from full attention matrices, the recommendation, the
cache and the command line, on a tiny random model."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import nsa_viz.audit as A
from nsa_viz.data import Sample, Span, TokenizedSet
from nsa_viz.models import apply_pattern, current_patterns
from nsa_viz.patterns import Dense, Dilated, GlobalLocal, NSA, SlidingWindow

from .conftest import random_ids, tiny_model

T, BLOCK = 96, 16


def samples(n=2, length=T, seed=1):
    ids = random_ids(n, length, seed=seed)
    return TokenizedSet("random", length, "cut", [Sample(ids[i], (Span(f"rand[{i}]", 0, length, 0),))
                                                   for i in range(n)], [], n, 0)


CANDS = [SlidingWindow(16), SlidingWindow(40), GlobalLocal(window=16, sink=4), GlobalLocal(window=40, sink=2),
         Dilated(stride=2, block=16, window=16)]


def run(model, data=None, **kw):
    kw.setdefault("candidates", CANDS)
    kw.setdefault("cache_dir", None)
    return A.audit(model, None, data if data is not None else samples(), length=T, n_docs=2, block=BLOCK,
                   rows=kw.pop("rows", T), progress=False, sink_tokens=4, local_distance=8, far_distance=48, **kw)


def brute_probs(model, ts):
    """[N, L, H, T, T] dense probabilities from eager attention (output_attentions)."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = [torch.stack(model(s.ids[None], output_attentions=True).attentions)[:, 0] for s in ts]
    finally:
        model.set_attn_implementation("sdpa")
    return torch.stack(out).double()


def visible(p, length=T):
    q = torch.arange(length)[:, None]
    return p.mask_mod(q, torch.arange(length)[None, :]).expand(length, length)


@pytest.fixture(scope="module")
def audited():
    model = tiny_model(seed=3)
    ts = samples()
    return model, ts, run(model, ts), brute_probs(model, ts)


def test_numbers_agree_with_full_attention_matrices(audited):
    model, ts, res, P = audited  # P [N, L, H, T, T]
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    d = q - k
    assert res.n_docs == 2 and (res.num_layers, res.num_heads) == (2, 4)
    for dist in (1, 8, 33, T):
        expect = (P * ((d >= 0) & (d < dist))).sum((-1, -2)) / T
        torch.testing.assert_close(res.mass_within(dist).double(), expect, atol=1e-5, rtol=0)
    for p in CANDS:
        per_query = (P * visible(p)).sum(-1)  # [N, L, H, T]
        r = res.recall(p, "head")
        torch.testing.assert_close(r["mean"].double(), per_query.mean((0, 3)), atol=1e-5, rtol=0)
        expect_p10 = torch.quantile(per_query.permute(1, 2, 0, 3).reshape(2, 4, -1), 0.1, dim=-1)
        torch.testing.assert_close(r["p10"].double(), expect_p10, atol=1e-5, rtol=0)
        model_r = res.recall(p)
        assert abs(model_r["mean"] - float(per_query.mean())) < 1e-5
        assert abs(model_r["p10"] - float(torch.quantile(per_query.flatten(), 0.1))) < 1e-5
        assert res.density(p) == pytest.approx(float(visible(p).sum()) / (T * (T + 1) / 2))
    late = torch.arange(T) >= T // 2
    heads = res.heads().set_index(["layer", "head"])
    sink = (P[..., :4].sum(-1))[..., late].mean((0, 3))
    far = (P * ((d >= 48) & (k >= 4))).sum(-1)[..., late].mean((0, 3))
    local = (P * ((d >= 0) & (d < 8))).sum(-1)[..., late].mean((0, 3))
    first = P[..., 2 * BLOCK:, :BLOCK].sum(-1).mean(-1).mean(0)
    for (layer, h), row in heads.iterrows():
        assert row.sink_mass == pytest.approx(float(sink[layer, h]), abs=1e-5)
        assert row.far_mass == pytest.approx(float(far[layer, h]), abs=1e-5)
        assert row.local_mass == pytest.approx(float(local[layer, h]), abs=1e-5)
        assert row.first_block_mass == pytest.approx(float(first[layer, h]), abs=1e-5)
        assert row.head_class in A.CLASSES
    # mass by block and the oracle choice of key blocks
    nb = T // BLOCK
    blocks = P.reshape(2, 2, 4, nb, BLOCK, nb, BLOCK).sum((4, 6))  # [N, L, H, NQB, NKB]
    torch.testing.assert_close(res.block_profile().double(), blocks.mean(0) / BLOCK, atol=1e-5, rtol=0)
    orc = res.oracle_table(ks=(2,)).iloc[0]
    assert orc.recall_mean == pytest.approx(float(blocks.topk(2, -1).values.sum((-1, -2)).mean() / T), abs=1e-5)
    dist = res.distance_table(grid=(8,))
    per_doc = ((P * ((d >= 0) & (d < 8))).sum((-1, -2)) / T).mean((1, 2))
    assert dist.iloc[0]["mean"] == pytest.approx(float(per_doc.mean()), abs=1e-5)


def test_sampled_rows_are_exact_at_those_rows(audited):
    model, ts, _, P = audited
    res = run(model, ts, rows=10)
    rows = res.row_pos
    assert len(rows) == 10 and rows.min() >= 0 and rows.max() < T
    p = GlobalLocal(window=16, sink=4)
    per_query = (P * visible(p)).sum(-1)[..., rows]  # [N, L, H, R]
    got = res._pattern_figures(p)[1]
    torch.testing.assert_close(got.double(), per_query, atol=1e-5, rtol=0)
    # mean: exact window part + sink part at the rows; close to the all-query value
    exact = (P * visible(p)).sum(-1).mean()
    assert abs(res.recall(p)["mean"] - float(exact)) < 0.05
    sw = SlidingWindow(40)
    assert res.recall(sw)["mean"] == pytest.approx(float((P * visible(sw)).sum(-1).mean()), abs=1e-5)


def test_nsa_visible_counts_match_the_token_mask():
    from nsa_viz.capture import SelectionMask

    g = torch.Generator().manual_seed(0)
    tk, blk, n = 150, 16, 4
    nsel = -(-tk // blk)
    idx = torch.stack([torch.randperm(nsel, generator=g)[:n] for _ in range(2 * tk)]).view(1, 2, tk, n)
    idx[..., -1] = torch.where(torch.rand(1, 2, tk, generator=g) < 0.3, -1, idx[..., -1])
    for window in (0, 20):
        mask = SelectionMask(idx, blk, window, tk).token_mask()
        assert torch.equal(A.nsa_visible_counts(idx, blk, window, tk), mask.sum(-1))


def test_recommendation_respects_its_target(audited):
    model, ts, res, P = audited

    def true_recall(p):
        return float((P * visible(p)).sum(-1).mean())

    for target in (0.3, 0.6, 0.99):
        rec = res.recommend(target_recall=target, per_layer=False)
        assert rec.met and rec.recall_mean >= target and true_recall(rec.uniform) >= target - 1e-6
        cheaper = [p for p in [Dense()] + CANDS if res.density(p) < rec.density]
        assert all(res.recall(p)["mean"] < target for p in cheaper), "a cheaper pattern met the target"
        per = res.recommend(target_recall=target, per_layer=True)
        for layer, p in per.pattern.items():
            per_query = (P[:, layer] * visible(p)).sum(-1)
            assert float(per_query.mean()) >= target - 1e-6
        assert per.density <= rec.density + 1e-9
    strict = res.recommend(target_recall=0.6, metric="p10", per_layer=False)
    assert strict.recall_p10 >= 0.6 and strict.density >= res.recommend(target_recall=0.6, per_layer=False).density
    for budget in (0.35, 0.6):
        rec = res.recommend(target_density=budget)
        assert rec.met and rec.density <= budget + 1e-9
        best = max(res.recall(p)["mean"] for p in CANDS if res.density(p) <= budget)
        assert rec.recall_mean >= best - 1e-9
    low = res.recommend(target_density=0.01)
    assert not low.met and "could not be met" in low.describe()
    # what it returns is something apply_pattern takes
    for pat in (res.recommend(target_recall=0.6, per_layer=False).pattern,
                res.recommend(target_recall=0.6, per_layer=True).pattern):
        with torch.no_grad(), apply_pattern(model, pat):
            model(ts.samples[0].ids[None])
    assert not current_patterns(model)
    with pytest.raises(ValueError, match="exactly one of"):
        res.recommend(target_recall=0.9, target_density=0.5)
    with pytest.raises(ValueError, match="fractions in"):
        res.recommend(target_recall=1.5)


def test_cache_hit_invalidation_and_interrupt(tmp_path, monkeypatch):
    model = tiny_model(seed=3)
    ts = samples()
    first = run(model, ts, cache_dir=str(tmp_path))
    run_dir = first.meta["cache_dir"]
    assert first.meta["cache_hits"] == 0 and len([f for f in os.listdir(run_dir) if f.endswith(".pt")]) == 2
    real_capture = A.capture

    def no_capture(*a, **k):
        raise AssertionError("capture ran although the cache holds the document")

    monkeypatch.setattr(A, "capture", no_capture)
    again = run(model, ts, cache_dir=str(tmp_path))
    assert again.meta["cache_hits"] == 2
    torch.testing.assert_close(again.mass_within(20), first.mass_within(20))
    monkeypatch.setattr(A, "capture", real_capture)
    # other weights, other settings or other text: a new computation
    other = run(tiny_model(seed=4), ts, cache_dir=str(tmp_path))
    assert other.meta["cache_hits"] == 0 and other.meta["cache_dir"] != run_dir
    assert run(model, ts, cache_dir=str(tmp_path), candidates=CANDS[:2]).meta["cache_hits"] == 0
    assert run(model, samples(seed=9), cache_dir=str(tmp_path)).meta["cache_hits"] == 0
    assert run(model, ts, cache_dir=str(tmp_path), refresh=True).meta["cache_hits"] == 0
    # a damaged entry is recomputed with a warning
    victim = ts.samples[0].digest()[:32] + ".pt"
    with open(os.path.join(run_dir, victim), "wb") as f:
        f.write(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        fixed = run(model, ts, cache_dir=str(tmp_path))
    assert fixed.meta["cache_hits"] == 1
    # Ctrl-C during the second document keeps the first
    calls = {"n": 0}

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_capture(*a, **k)

    monkeypatch.setattr(A, "capture", interrupting)
    with pytest.warns(UserWarning, match="1 of 2 documents"):
        part = run(model, samples(seed=11), cache_dir=str(tmp_path))
    assert part.meta["interrupted"] and part.n_docs == 1
    monkeypatch.setattr(A, "capture", real_capture)
    resumed = run(model, samples(seed=11), cache_dir=str(tmp_path))
    assert resumed.meta["cache_hits"] == 1 and resumed.n_docs == 2


def test_audit_refuses_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="length must be"):
        A.audit(model, None, samples(), length=1)
    with pytest.raises(ValueError, match="NSA goes in compare"):
        run(model, candidates=[NSA()])
    with pytest.raises(ValueError, match="samples given are of 96 tokens"):
        A.audit(model, None, samples(), length=64, cache_dir=None)
    with apply_pattern(model, SlidingWindow(8)):
        with pytest.raises(ValueError, match="remove_pattern"):
            run(model)
    assert A.parse_pattern("NSA(top_n=8, block=32, window=128)") == NSA(top_n=8, block=32, window=128)
    assert A.parse_pattern("SlidingWindow(512)") == SlidingWindow(512)
    for bad in ("os.system('x')", "SlidingWindow(window=__import__('os'))", "Foo(1)"):
        with pytest.raises(ValueError, match="pattern"):
            A.parse_pattern(bad)


def test_periodicity_and_classes():
    d = torch.arange(1, 400).double()
    assert A.periodicity(1 / d)[0] == 0
    period, acf, amp = A.periodicity((1 / d) * (1 + 4 * (d % 8 == 0)))
    assert period == 8 and acf > 0.5 and amp > 0.3
    assert A.classify_head(sink=0.1, local=0.1, far=0.5, periodic_acf=0, periodic_amp=0) == "retrieval"
    assert A.classify_head(0.1, 0.1, 0.0, 0.9, 0.6) == "strided"
    assert A.classify_head(0.8, 0.1, 0.0, 0.0, 0.0) == "sink"
    assert A.classify_head(0.1, 0.7, 0.0, 0.0, 0.0) == "local"
    assert A.classify_head(0.2, 0.3, 0.1, 0.0, 0.0) == "mixed"


def _save_tiny_model_with_tokenizer(folder):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 3}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    tiny_model(seed=5).save_pretrained(folder)


def test_cli_end_to_end(tmp_path, capsys):
    from nsa_viz.cli import main

    model_dir = str(tmp_path / "model")
    _save_tiny_model_with_tokenizer(model_dir)
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 12)
    out = tmp_path / "report"
    argv = ["audit", "--model", model_dir, "--data", str(text), "--length", "64", "--n", "3", "--block", "16",
            "--rows", "16", "--target-recall", "0.8", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "recommendation:" in printed and "SW(" in printed
    report = json.loads((out / "audit.json").read_text())
    assert report["meta"]["n_docs"] == 3 and report["meta"]["length"] == 64
    assert report["recommendation"]["target"] == {"recall": 0.8, "metric": "mean"}
    assert report["recommendation"]["recall_mean"] >= 0.8
    assert {r["pattern"] for r in report["summary"]} >= {"Dense", "SW(16)", "GL(16+4)"}
    assert len(report["heads"]) == 2 * 4
    small = json.loads((out / "audit_summary.json").read_text())
    assert "heads" not in small and "sink_mass" in small["headline"] and small["recommendation"]["recall_mean"] >= 0.8
    assert small["meta"]["cpu_seconds"] > 0 and small["meta"]["threads"] >= 1
    html = (out / "audit.html").read_text()
    assert "fig-recall_vs_density" in html and "plotly" in html.lower()
    pytest.importorskip("pyarrow")
    import pandas as pd

    heads = pd.read_parquet(out / "heads.parquet")
    assert list(heads.head_class.unique())[0] in A.CLASSES
    assert main(argv) == 0 and "(3 from cache)" in capsys.readouterr().out


def test_nsa_compare_takes_part():
    """NSA measured by capture on every query: its density is counted from the selected blocks, its recall
    is at least that of its own window, and the recommendation may pick it."""
    model = tiny_model(seed=3)
    nsa = NSA(block=16, top_n=3, window=16, cmp_block=16, cmp_stride=8, init_blocks=1, local_blocks=1)
    res = run(model, compare=[nsa], candidates=[SlidingWindow(16), SlidingWindow(48)])
    summ = res.summary().set_index("pattern")
    row = summ.loc["NSA(3x16+16)"]
    assert row.source == "capture (all queries)" and 0 < row.density < 1
    assert row.density > res.density(SlidingWindow(16))
    assert row.recall_mean >= res.recall(SlidingWindow(16))["mean"] - 1e-6
    per_head = res.recall(nsa, "head")["mean"]
    assert per_head.shape == (2, 4) and float(per_head.min()) > 0
    rec = res.recommend(target_recall=float(row.recall_mean), per_layer=False)
    assert rec.density <= row.density + 1e-9
    # the headline figures: mass within distances, named patterns, windows at NSA's density
    h = res.headline(window=16, distances=(8, 16))
    assert h["mass_within"]["16"]["mean"] == pytest.approx(float(res.mass_within(16).mean()), abs=1e-6)
    assert h["patterns"]["NSA(3x16+16)"]["recall_mean"] == pytest.approx(float(row.recall_mean))
    assert h["patterns"]["SW(16)"]["density"] == pytest.approx(res.density(SlidingWindow(16)))
    same = h["equal_density"]["NSA(3x16+16)"]
    assert same["density"] == pytest.approx(float(row.density))
    lo, hi = (res.recall(SlidingWindow(w))["mean"] for w in (16, 48))
    assert lo - 1e-9 <= same["SlidingWindow"]["recall_mean"] <= hi + 1e-9
    assert 16 <= same["SlidingWindow"]["window"] <= 48
    assert 0 <= h["sink_mass"] <= 1 and 0 <= h["far_mass"] <= 1


def test_density_counts_partial_tiles_exactly():
    """Pattern density (what the audit's costs are) counts partial tiles token by token: equal to the
    sum of the token mask, for windows, sinks, dilation, custom tile bitmaps and per-head layouts."""
    from nsa_viz.kernels.layout import BlockLayout, TokenRule, layout_from_mask_mod

    layouts = [p.compile(tq, tk, block_q=bq, block_kv=bk)
               for p in (SlidingWindow(100), GlobalLocal(window=70, sink=5), Dilated(stride=4, block=16, window=50),
                         Dense(), SlidingWindow(33, causal=False))
               for tq, tk, bq, bk in ((300, 300, 64, 64), (77, 300, 16, 32), (1, 257, 16, 16))]
    layouts.append(layout_from_mask_mod(lambda q, k: ((q - k) % 7 == 0) & (k <= q), 200, 230, 32, 16))
    g = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 3, (2, 3, 5, 5), generator=g).to(torch.int8)
    layouts.append(BlockLayout(70, 80, 16, 16, tiles, TokenRule(causal=True, window=20)))
    for layout in layouts:
        assert torch.equal(layout._visible_pairs(), layout.token_mask().sum((-1, -2)).double()), layout


def test_workers_give_the_same_audit(tmp_path):
    """Documents computed in two forked workers: the same figures as one process, cache entries written,
    and the workers' CPU time counted."""
    model = tiny_model(seed=3)
    ts = samples(n=3, seed=2)
    one = run(model, ts)
    two = run(model, ts, workers=2, cache_dir=str(tmp_path))
    assert two.meta["workers"] == 2 and two.n_docs == 3 and two.meta["cpu_seconds"] > 0
    assert [d.source for d in two.docs] == [d.source for d in one.docs]
    torch.testing.assert_close(two.mass_within(20), one.mass_within(20), atol=1e-6, rtol=0)
    for p in CANDS:
        assert two.recall(p)["p10"] == pytest.approx(one.recall(p)["p10"], abs=1e-6)
    assert run(model, ts, workers=2, cache_dir=str(tmp_path)).meta["cache_hits"] == 3
    with pytest.raises(ValueError, match="workers must be"):
        run(model, ts, workers=0)


def test_a_failing_worker_is_reported(monkeypatch):
    def broken(*a, **k):
        raise ValueError("boom in capture")

    monkeypatch.setattr(A, "capture", broken)
    with pytest.raises(RuntimeError, match="boom in capture"):
        run(tiny_model(seed=3), samples(n=2, seed=4), workers=2)
