"""Learnable NSA (nsa_viz.nsa_module) and its training loops (nsa_viz.training), on tiny models.

Gradients of every learnable part are checked twice: against central finite differences in float64
through the naive oracle ``nsa_attention_reference`` (so the oracle's own autograd is not trusted
blindly), and, where the kernels are installed, the kernels' gradients against the oracle's.
"""
from __future__ import annotations

import math

import pytest
import torch

from nsa_viz.nsa_module import (DEFAULT_GATE_INIT, BlockCompressor, BranchGates, NSAAttention, NSARetrofit,
                                compressed_entropy, gate_stats, saturation_penalty, selection_distillation,
                                selection_diversity)
from nsa_viz.patterns import NSA
from nsa_viz.training import (RetrofitConfig, ScratchConfig, TokenStream, load_checkpoint,
                              retrofit_perplexity, retrofit_train, save_checkpoint, summarize_stats,
                              train_from_scratch)

from .conftest import random_ids, tiny_model

@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread avoids oversubscription on a shared CPU (tens of times faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SPEC = NSA(block=16, top_n=4, window=24, cmp_block=8, cmp_stride=4, combine="gated")


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every parameter off its initial value so that no path is dead (zero-initialised layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _attention(dtype=torch.float32, backend="oracle", seed=0, spec=SPEC, gate_init=DEFAULT_GATE_INIT):
    torch.manual_seed(seed)
    att = NSAAttention(spec, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=16, gate_hidden=8,
                       compress_hidden=8, backend=backend, gate_init=gate_init).to(dtype)
    _randomise(att, seed)
    return att


def _inputs(t=56, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, 4, 32, generator=g, dtype=dtype)
    k = torch.randn(1, t, 2, 32, generator=g, dtype=dtype)
    v = torch.randn(1, t, 2, 32, generator=g, dtype=dtype)
    h = torch.randn(1, t, 16, generator=g, dtype=dtype)
    w = torch.randn(1, t, 4, 32, generator=g, dtype=dtype)   # random projection of the output: the loss
    return q, k, v, h, w


# --------------------------------------------------------------------------- learnable parts
def test_compressor_starts_as_mean_pooling():
    from nsa_viz.kernels.nsa_ref import nsa_attention_reference

    torch.manual_seed(0)
    comp = BlockCompressor(32, 2, 8, 4)
    x = torch.randn(2, 45, 2, 32)
    got = comp(x)
    nc = (45 - 8) // 4 + 1
    want = torch.stack([x[:, j * 4:j * 4 + 8].mean(1) for j in range(nc)], 1)
    assert got.shape == (2, nc, 2, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # so a fresh gated module equals the oracle run with its default (mean) compression
    att = NSAAttention(SPEC, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=16, backend="oracle")
    q, k, v, h, _ = _inputs()
    gates = att.gates(h)
    want = nsa_attention_reference(q, k, v, **att.kernel_kwargs(), gates=gates)
    torch.testing.assert_close(att(q, k, v, h), want, rtol=1e-5, atol=1e-5)
    # fewer tokens than one block: no compressed keys, still differentiable
    assert comp(x[:, :5]).shape == (2, 0, 2, 32)


def test_gates_start_at_their_initial_values():
    gates = BranchGates(16, 4, init=(0.1, 0.8, 0.4))
    out = gates(torch.randn(3, 7, 16))
    assert out.shape == (3, 7, 4, 3)
    torch.testing.assert_close(out, torch.tensor([0.1, 0.8, 0.4]).expand(3, 7, 4, 3), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        BranchGates(16, 4, init=(0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="3 values"):
        BranchGates(16, 4, init=(0.5, 0.5))


def test_every_learnable_gradient_matches_finite_differences_through_the_oracle():
    # a cmp gate starting saturated, so that the saturation penalty is live too
    att = _attention(torch.float64, "oracle", gate_init=(0.005, 0.9, 0.1))
    att.entropy_weight, att.selection_weight, att.saturation_weight = 0.3, 0.5, 0.2
    att.train()
    q, k, v, h, w = _inputs(dtype=torch.float64)

    def loss():
        out = att(q, k, v, h)
        return (out * w).sum() + att.aux_loss

    loss().backward()
    names = [n for n, _ in att.named_parameters()]
    assert {n.split(".")[0] for n in names} == {"compress_k", "compress_v", "gates"}
    g = torch.Generator().manual_seed(3)
    eps = 1e-6
    for name, p in att.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        u = torch.randn(p.shape, generator=g, dtype=p.dtype)
        with torch.no_grad():
            p.add_(eps * u)
            up = loss().item()
            p.sub_(2 * eps * u)
            down = loss().item()
            p.add_(eps * u)
        fd = (up - down) / (2 * eps)
        an = float((p.grad * u).sum())
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(fd)), f"{name}: finite difference {fd} vs autograd {an}"


def test_kernel_gradients_match_the_oracle():
    pytest.importorskip("nsa_viz.kernels.nsa")
    q, k, v, h, w = _inputs(t=70)
    grads = {}
    for backend in ("oracle", "reference"):
        att = _attention(torch.float32, backend)
        (att(q, k, v, h) * w).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in att.named_parameters()}
    for name, want in grads["oracle"].items():
        torch.testing.assert_close(grads["reference"][name], want, rtol=2e-4, atol=2e-5, msg=name)


def test_entropy_loss_is_normalised_and_pushes_scores_apart():
    q, k, v, h, _ = _inputs(t=64)
    comp = BlockCompressor(32, 2, 8, 4)
    kc = comp(k).detach().requires_grad_(True)
    ent = compressed_entropy(q, kc, SPEC)
    assert 0.0 < ent.item() <= 1.0
    ent.backward()
    assert kc.grad.abs().sum() > 0
    # identical compressed keys: every query spreads evenly, the entropy is exactly 1
    flat = torch.zeros_like(kc)
    assert float(compressed_entropy(q, flat, SPEC)) == pytest.approx(1.0, abs=1e-6)


def test_selection_distillation_teaches_the_compression_where_dense_attention_goes():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 160, 4, 32, generator=g)
    k = torch.randn(1, 160, 2, 32, generator=g)
    k[:, 100:104] += 2 * q[:, -1, :2]            # a block that late queries attend to strongly
    torch.manual_seed(0)
    comp = BlockCompressor(32, 2, 8, 4)
    opt = torch.optim.Adam(comp.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = selection_distillation(q, k, comp(k), SPEC)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0]
    # nothing to choose (every visible block fits in top_n): no signal, no error
    short = selection_distillation(q[:, :40], k[:, :40], comp(k[:, :40]), SPEC)
    assert short.item() == 0.0


def test_saturation_penalty_is_zero_inside_the_margin_and_pushes_back_outside():
    inside = torch.tensor([-3.0, 0.0, 3.0], requires_grad=True)
    assert saturation_penalty(inside).item() == 0.0
    outside = torch.tensor([-6.0, 6.0], requires_grad=True)
    pen = saturation_penalty(outside)
    pen.backward()
    assert pen.item() > 0 and outside.grad[0] < 0 < outside.grad[1]   # descent moves both toward 0


def test_module_argument_errors():
    with pytest.raises(TypeError, match="spec must be"):
        NSAAttention("nsa", num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=16)
    with pytest.raises(ValueError, match="hidden_size"):
        NSAAttention(SPEC, num_heads=4, num_kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match="combine='gated'"):
        NSAAttention(NSA(block=16, top_n=4, window=24, cmp_block=8, cmp_stride=4, combine="union"), num_heads=4,
                     num_kv_heads=2, head_dim=32, hidden_size=16, learn_gates=True)
    with pytest.raises(ValueError, match="backend"):
        NSAAttention(SPEC, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=16, backend="cuda")
    att = NSAAttention(SPEC, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=16, backend="oracle")
    q, k, v, h, _ = _inputs()
    with pytest.raises(ValueError, match="hidden state"):
        att(q, k, v)


# --------------------------------------------------------------------------- guards
def _block_idx_rows(picks_of_row, tq, kv_len, top_n):
    """[1, 1, Tq, top_n] from a function row position -> list of blocks."""
    rows = []
    for p in range(kv_len - tq, kv_len):
        blocks = sorted(set(picks_of_row(p)))[:top_n]
        rows.append(blocks + [-1] * (top_n - len(blocks)))
    return torch.tensor(rows, dtype=torch.int32)[None, None]


def test_collapse_indicator_detects_planted_collapse():
    block, kv_len, top_n = 16, 1024, 8
    forced = lambda p: [0, p // block, max(p // block - 1, 0)]
    gen = torch.Generator().manual_seed(0)

    def random_picks(p):
        cur = p // block
        cands = list(range(1, max(cur - 1, 1)))
        perm = torch.randperm(len(cands), generator=gen).tolist()
        return forced(p) + [cands[i] for i in perm[:top_n - 3]]

    window = lambda p: forced(p) + [p // block - d for d in range(2, top_n - 1) if p // block - d > 0]
    fixed = lambda p: forced(p) + [b for b in range(1, top_n - 2) if b < p // block - 1]
    kw = dict(block=block, kv_len=kv_len, init_blocks=1, local_blocks=2)
    healthy = selection_diversity(_block_idx_rows(random_picks, kv_len, kv_len, top_n), **kw)
    as_window = selection_diversity(_block_idx_rows(window, kv_len, kv_len, top_n), **kw)
    as_fixed = selection_diversity(_block_idx_rows(fixed, kv_len, kv_len, top_n), **kw)
    assert not healthy["collapsed"] and healthy["pick_entropy_ratio"] > 0.9 and healthy["window_like"] < 0.1
    assert as_window["collapsed"] and as_window["window_like"] > 0.95
    assert as_fixed["collapsed"] and as_fixed["pick_entropy_ratio"] < 0.5
    assert healthy["informative_rows"] == as_window["informative_rows"] > 0
    # a row with nothing to choose (every visible block is taken) carries no evidence either way
    short = selection_diversity(_block_idx_rows(window, 64, 64, top_n), **{**kw, "kv_len": 64})
    assert short["informative_rows"] == 0 and not short["collapsed"]
    # summary across layers names the collapsed one
    summary = summarize_stats({0: healthy, 3: as_fixed})
    assert summary["collapsed_layers"] == [3]


def test_gate_saturation_is_reported():
    ok = gate_stats(torch.full((1, 5, 4, 3), 0.5))
    assert not ok["gates_saturated"] and ok["saturated_slc"] == 0.0
    sat = torch.tensor([0.001, 0.999, 0.5]).expand(1, 5, 4, 3)
    st = gate_stats(sat)
    assert st["gates_saturated"] and st["saturated_cmp"] == 1.0 and st["saturated_win"] == 0.0
    with pytest.raises(ValueError, match="gates must be"):
        gate_stats(torch.zeros(1, 5, 4))


# --------------------------------------------------------------------------- inside a model
SMALL = NSA(block=16, top_n=3, window=16, cmp_block=8, cmp_stride=4, combine="gated")


def test_retrofit_installs_disables_and_restores_exactly():
    model = tiny_model("llama", head_dim=32)
    ids = random_ids(2, 80)
    with torch.no_grad():
        dense = model(ids).logits
    retro = NSARetrofit(model, SMALL, backend="oracle")
    assert all(not n.startswith("model") for n in retro.state_dict())   # only NSA parameters are saved
    with retro.installed(model):
        assert model.config._attn_implementation == "nsa_viz_trainable"
        with torch.no_grad():
            sparse = model(ids).logits
            with retro.disabled():
                torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)
        assert (sparse - dense).abs().max() > 1e-3
        with pytest.raises(RuntimeError, match="already installed"):
            retro.install(model)
        # generation with a KV cache: the new query sits at the end of the keys, gates see its hidden state
        gen = model.generate(ids[:1, :40], max_new_tokens=3, do_sample=False)
        assert gen.shape == (1, 43)
        with pytest.raises(ValueError, match="padded"), torch.no_grad():
            model(ids, attention_mask=torch.tensor([[0] * 5 + [1] * 75, [1] * 80]))
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)


def _fixed_stream(seq_len, vocab=128, seed=5):
    """A stream whose training part is exactly one window: every batch is the same batch."""
    ids = random_ids(1, seq_len, vocab, seed)[0]
    st = TokenStream(torch.cat([ids, ids[:8]]), val_fraction=0.0)
    st.train, st.val = ids, ids
    return st


@pytest.mark.parametrize("objective,queries", [("transfer", None), ("transfer", 40), ("kl", None)])
def test_retrofit_steps_lower_the_loss_on_a_fixed_batch(objective, queries):
    model = tiny_model("llama", head_dim=32)
    torch.manual_seed(0)
    retro = NSARetrofit(model, SMALL, backend="oracle")
    cfg = RetrofitConfig(steps=8, seq_len=96, objective=objective, lr=1e-2, warmup=0, monitor_every=4,
                         kl_weight=1.0, lm_weight=0.0, transfer_queries=queries)
    hist = retrofit_train(model, retro, _fixed_stream(96), cfg, progress=False)
    assert len(hist) == 8 and hist["loss"].iloc[-1] < 0.8 * hist["loss"].iloc[0]
    assert {"window_like", "pick_entropy_ratio", "gate_slc", "saturated_cmp"} <= set(hist.columns)
    assert all(not p.requires_grad for p in model.parameters())   # the base stayed frozen
    assert model.config._attn_implementation == "sdpa"              # and was given back


def test_from_scratch_nsa_steps_lower_the_loss_on_a_fixed_batch():
    cfg = ScratchConfig(steps=12, seq_len=64, batch_size=2, lr=1e-2, warmup=0, hidden_size=64, num_heads=2,
                        num_kv_heads=1, intermediate_size=128, vocab_size=128, eval_every=12, eval_batches=1,
                        monitor_every=6)
    model, retro, hist = train_from_scratch(_fixed_stream(64), SMALL, cfg, progress=False, nsa_backend="oracle")
    assert retro is not None and hist["lm_loss"].iloc[-1] < hist["lm_loss"].iloc[0] - 0.5
    assert "val_loss" in hist and hist["val_loss"].notna().sum() == 1
    # dense, same seed: the same initial loss (same weights, same batch), only the attention differs
    _, none, dense = train_from_scratch(_fixed_stream(64), None, cfg, progress=False)
    assert none is None
    assert dense["lm_loss"].iloc[0] == pytest.approx(hist["lm_loss"].iloc[0], abs=0.05)


def test_checkpoint_round_trip_and_exact_resume(tmp_path):
    model = tiny_model("llama", head_dim=32)
    stream = TokenStream(random_ids(1, 400, 128, 9)[0], val_fraction=0.2)

    def fresh():
        torch.manual_seed(0)
        return NSARetrofit(model, SMALL, backend="oracle")

    cfg = RetrofitConfig(steps=4, seq_len=48, lr=5e-3, warmup=0, monitor_every=0, checkpoint_every=2)
    straight = fresh()
    h_full = retrofit_train(model, straight, stream, cfg, progress=False)

    class Interrupted(Exception):
        pass

    class Interrupting:
        """The stream, interrupted when step 3 asks for its batch (after the checkpoint of step 2)."""

        def batch(self, step, *a, **kw):
            if step == 2:
                raise Interrupted
            return stream.batch(step, *a, **kw)

    with pytest.raises(Interrupted):
        retrofit_train(model, fresh(), Interrupting(), cfg, checkpoint_dir=tmp_path, progress=False)
    assert model.config._attn_implementation == "sdpa"
    resumed = fresh()
    with pytest.raises(ValueError, match="other settings"):
        retrofit_train(model, resumed, stream, RetrofitConfig(**{**cfg.__dict__, "seq_len": 32}),
                       checkpoint_dir=tmp_path, progress=False)
    h_res = retrofit_train(model, resumed, stream, cfg, checkpoint_dir=tmp_path, progress=False)
    assert list(h_res["step"]) == [1, 2, 3, 4]
    assert h_res["loss"].tolist() == pytest.approx(h_full["loss"].tolist(), rel=1e-4, abs=1e-6)
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)
    # plain save/load round trip into a fresh module
    path = save_checkpoint(tmp_path / "x.pt", module=resumed, step=4, history=[{"step": 4}])
    other = fresh()
    state = load_checkpoint(path, module=other)
    assert state["step"] == 4 and state["history"] == [{"step": 4}]
    for (n, a), (_, b) in zip(resumed.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt", module=other)


def test_retrofit_perplexity_table():
    model = tiny_model("llama", head_dim=32)
    stream = TokenStream(random_ids(1, 300, 128, 4)[0], val_fraction=0.5)
    retro = NSARetrofit(model, SMALL, backend="oracle")
    df = retrofit_perplexity(model, retro, stream.windows(2, 64), progress=False)
    assert list(df["window"]) == [0, 1, "all"]
    pooled = df.iloc[-1]
    assert pooled["tokens"] == 126 and pooled["ppl_ratio"] == pytest.approx(pooled["ppl"] / pooled["dense_ppl"])
    assert pooled["kl_vs_dense"] > 0
    same = retrofit_perplexity(model, None, stream.windows(1, 64), progress=False)
    assert same.iloc[-1]["ppl_ratio"] == pytest.approx(1.0)
    # a shared dense cache: filled by the first call, reused (not recomputed) by the next
    cache = [None, None]
    first = retrofit_perplexity(model, retro, stream.windows(2, 64), progress=False, dense_hidden=cache)
    assert all(h is not None and h.shape == (1, 64, model.config.hidden_size) for h in cache)
    assert first["dense_ppl"].tolist() == pytest.approx(df["dense_ppl"].tolist())
    planted = [torch.zeros_like(h) for h in cache]   # a wrong "dense" must show up, proving the cache is read
    again = retrofit_perplexity(model, retro, stream.windows(2, 64), progress=False, dense_hidden=planted)
    assert again.iloc[-1]["dense_ppl"] == pytest.approx(128.0, rel=1e-3)   # zero hidden -> uniform over 128 ids
    with pytest.raises(ValueError, match="dense_hidden"):
        retrofit_perplexity(model, retro, stream.windows(2, 64), progress=False, dense_hidden=[None])


def test_token_stream():
    from nsa_viz.data import from_texts

    ds = from_texts([f"document {i} " * 40 for i in range(10)])
    st = TokenStream.from_dataset(ds, max_chars=2000, val_fraction=0.25)
    assert st.train.numel() + st.val.numel() == 2000 and st.val.numel() == 500
    a, b = st.batch(3, 2, 16, seed=1), st.batch(3, 2, 16, seed=1)
    assert torch.equal(a, b) and a.shape == (2, 16) and not torch.equal(a, st.batch(4, 2, 16, seed=1))
    assert [w.shape for w in st.windows(3, 100)] == [(1, 100)] * 3
    with pytest.raises(ValueError, match="seq_len"):
        st.batch(0, 1, 10_000)
    with pytest.raises(ValueError, match="windows"):
        st.windows(6, 100)
    with pytest.raises(TypeError, match="Dataset"):
        TokenStream.from_dataset(["text"])
    with pytest.raises(ValueError, match="objective"):
        RetrofitConfig(objective="mse")


def _bench_training_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"
    spec = importlib.util.spec_from_file_location("bench_training_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_training_scratch_small(tmp_path):
    """The from-scratch part of benchmarks/bench_training.py at toy sizes: both runs land in the JSON with
    their curves, the figure draws them, and the time budget stops a stream between steps."""
    import json

    bench = _bench_training_script()
    out = tmp_path / "scratch.json"
    assert bench.main(["scratch", "--small", "--steps", "4", "--max-chars", "20000", "--no-progress", "--out", str(out),
                       "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    doc = json.loads(out.read_text())
    assert sorted(r["label"] for r in doc["runs"]) == ["dense", "nsa"]
    for run in doc["runs"]:
        assert [row["step"] for row in run["curve"]] == [1, 2, 3, 4]
        assert run["curve"][-1]["val_loss"] == pytest.approx(run["final_val_loss"])
        assert run["train_seconds"] > 0 and math.isfinite(run["final_val_loss"])
    fig = bench.curves_figure(doc)
    assert len(fig.data) == 8   # per run: train line and validation markers, against step and seconds
    budgeted = bench._Budgeted(TokenStream(torch.arange(100)), seconds=-1.0)
    with pytest.raises(bench.BudgetSpent):
        budgeted.batch(0, 1, 8)
