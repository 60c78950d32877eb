"""nsa_viz.tradeoffs: the table's schema, failures recorded not fatal, ratios against the dense baseline
of the same run, crossovers and Pareto flags, tables round-tripping on disk, figures built from a saved
table, and `nsa-viz bench --quick` end to end on a tiny random model (seconds, not minutes)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from nsa_viz import Custom, SlidingWindow
from nsa_viz import tradeoffs as tr

from .conftest import tiny_model

FAST = dict(warmup_ms=1.0, rep_ms=3.0, progress=False)


def _row(run, op, T, ms, *, base=False, pass_="fwd", **kw):
    return {"run_id": run, "level": "kernel", "op": op, "impl": "sdpa" if base else "nsa_viz", "pattern": op,
            "is_baseline": base, "pass": pass_, "B": 1, "T": T, "HQ": 4, "HKV": 2, "D": 32, "dtype": "float32",
            "ms": ms, "status": "ok", **kw}


# --------------------------------------------------------------------------- schema and rows
def test_recorder_rows_carry_every_schema_column_and_environment():
    rec = tr.Recorder(mode="quick", verbose=False)
    row = rec.add(level="kernel", op="dense", T=8, ms=1.5)
    assert list(row)[: len(tr.COLUMNS)] == tr.COLUMNS and set(row) == set(tr.COLUMNS)
    assert row["run_id"] == rec.run_id and row["mode"] == "quick" and row["status"] == "ok"
    assert row["device_type"] == "cpu" and row["torch"] == torch.__version__ and row["date"]
    with pytest.raises(ValueError, match="unknown row fields.*speed"):
        rec.add(speed=3)


def test_kernel_rows_schema_values_and_density():
    rec = tr.Recorder(verbose=False)
    rows = tr.bench_kernels(rec, ["window:window=32"], [64, 96], q_heads=4, kv_heads=2, head_dim=32, **FAST)
    assert len(rows) == 2 * 2 * 3  # lengths x (dense + window) x passes
    for r in rows:
        assert set(r) == set(tr.COLUMNS) and r["status"] == "ok", r
        assert r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"] and r["repeats"] >= 3
        assert r["peak_mem_mb"] > 0 and r["mem_kind"] == "cpu_process_peak_rss"
        assert (r["HQ"], r["HKV"], r["D"], r["dtype"]) == (4, 2, 32, "float32")
    dense = [r for r in rows if r["is_baseline"]]
    assert {r["impl"] for r in dense} == {"sdpa"} and all(r["density"] == 1.0 for r in dense)
    win = {(r["T"], r["pass"]): r for r in rows if r["op"] == "sliding_window"}
    assert win[(96, "fwd")]["backend"] == "reference"
    assert win[(96, "fwd")]["density"] == pytest.approx(SlidingWindow(32).compile(96).density)
    assert win[(96, "decode")]["density"] == pytest.approx(32 / 96)
    assert win[(96, "fwd")]["params"] == {"window": 32, "causal": True}


def test_rows_are_saved_after_each_length_and_a_resave_replaces_them(tmp_path):
    out = tmp_path / "tradeoffs_cpu.json"
    rec = tr.Recorder(verbose=False, out=out)
    tr.bench_kernels(rec, ["window:window=32"], [64, 96], q_heads=4, kv_heads=2, head_dim=32, passes=("fwd",), **FAST)
    saved = tr.read_table(out)
    assert len(saved) == 4 and set(saved["run_id"]) == {rec.run_id}
    assert saved["speedup_vs_dense"].notna().all()  # derived columns are saved with the rows
    tr.append_rows(tr.add_derived([_row("other", "dense", 64, 1.0, base=True)]), out)
    rec.save()  # this run's rows are replaced, the other run's kept
    assert len(tr.read_table(out)) == 5


def test_short_labels_name_only_what_differs_from_the_defaults():
    rows = tr.add_derived([_row("R", "dense", 64, 1.0, base=True, pattern="dense (sdpa)")])
    assert tr.short_label(rows.iloc[0].to_dict()) == "dense (sdpa)"
    nsa = tr.parse_pattern("nsa:block=32,top_n=4")
    row = {"op": tr.pattern_op(nsa), "params": tr.pattern_params(nsa), "pattern": nsa.label}
    assert tr.short_label(row) == "nsa(block=32, top_n=4, window=512)"
    row["params"] = tr.pattern_params(tr.parse_pattern("nsa:granularity=block"))
    assert tr.short_label(row) == "nsa(block=64, top_n=16, window=512, granularity=block)"
    gl = tr.parse_pattern("global_local:window=128,sink=32")
    assert tr.short_label({"op": "global_local", "params": tr.pattern_params(gl)}) == "global_local(window=128, sink=32)"


@pytest.mark.slow
def test_random_weight_smollm2_has_the_real_architecture(smollm2):
    real = smollm2[0].config
    model, tok = tr.load_bench_model("smollm2", "cpu", random_weights=True)
    assert tok is None
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "hidden_act"):
        assert getattr(model.config, key) == getattr(real, key), key
    assert model.config.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in smollm2[0].parameters())


def test_nsa_decode_step_is_the_last_row_of_nsa_over_the_sequence():
    from nsa_viz.attention import nsa_kernels_available, run_pattern

    if not nsa_kernels_available():
        pytest.skip("NSA kernels not installed")
    pattern = tr.parse_pattern("nsa:block=32,top_n=4,window=64")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 300, 32, generator=g) for h in (4, 2, 2))
    full = run_pattern(pattern, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 32 ** -0.5).transpose(1, 2)
    step = tr.kernel_attention(pattern, decode=True)
    first, again = step(q[:, :, -1:], k, v), step(q[:, :, -1:], k, v)  # the timed calls repeat the same step
    torch.testing.assert_close(first, full[:, :, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, first)


def test_parse_pattern_and_clear_errors():
    assert tr.parse_pattern("window:window=128") == SlidingWindow(128)
    nsa = tr.parse_pattern("nsa:block=32,top_n=4,granularity=block")
    assert (nsa.block, nsa.top_n, nsa.granularity) == (32, 4, "block")
    assert tr.pattern_op(tr.parse_pattern("global_local:window=64,sink=8")) == "global_local"
    with pytest.raises(ValueError, match="pattern name must be one of"):
        tr.parse_pattern("windw:window=3")
    with pytest.raises(ValueError, match="keys in"):
        tr.parse_pattern("window:size=3")
    with pytest.raises(TypeError, match="Pattern or a spec string"):
        tr.parse_pattern(3)


# --------------------------------------------------------------------------- failures recorded, run goes on
def test_failing_pattern_is_recorded_and_the_run_goes_on():
    def broken(q, k):
        raise RuntimeError("injected failure")

    rec = tr.Recorder(verbose=False)
    rows = tr.bench_kernels(rec, [Custom(broken, name="broken"), "window:window=32", "nsa:block=32,top_n=4"], [64],
                            q_heads=4, kv_heads=2, head_dim=32, passes=("fwd", "decode"), **FAST)
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
    assert [r["status"] for r in by_op["custom"]] == ["failed", "failed"]
    assert all("injected failure" in r["note"] and r["ms"] is None for r in by_op["custom"])
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in by_op["sliding_window"] + by_op["dense"])
    from nsa_viz.attention import nsa_kernels_available

    if not nsa_kernels_available():
        assert {r["status"] for r in by_op["nsa"]} == {"unsupported"}
    df = tr.add_derived(rows)  # failed rows get no ratio, the others do
    assert df[df["op"] == "custom"]["speedup_vs_dense"].isna().all()
    assert df[df["op"] == "sliding_window"]["speedup_vs_dense"].notna().all()


def test_failure_during_timing_and_oom_are_classified():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

    res = tr.measure_many({"ok": tr.Trial(lambda: None), "flaky": tr.Trial(flaky)}, "cpu", warmup_ms=0, rep_ms=1)
    assert isinstance(res["ok"], tr.Timing) and res["ok"].repeats >= 3
    assert isinstance(res["flaky"], RuntimeError)
    assert tr.classify_failure(res["flaky"])[0] == "oom"
    assert tr.classify_failure(NotImplementedError("x"))[0] == "unsupported"
    assert tr.classify_failure(KeyError("x"))[0] == "failed"


def test_largest_batch_doubles_then_bisects_and_propagates_other_errors():
    tried = []

    def fits(b):
        tried.append(b)
        if b > 37:
            raise RuntimeError("CUDA out of memory")
        return 10.0 * b  # e.g. the probe's peak memory

    found = tr.largest_batch(fits, cap=1024)
    assert (found.max_batch, found.first_oom, found.stopped, found.peak_mb) == (37, 38, "bracket", 370.0)
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64] and [b for b, _, _ in found.probes] == tried
    assert [r for b, r, _ in found.probes if b > 37] == ["oom"] * sum(b > 37 for b in tried)
    assert "limit in [37, 38)" in found.note() and "64 oom" in found.note()
    # a tolerance stops the bisection early: the answer is within it, below the true limit
    tried.clear()
    loose = tr.largest_batch(fits, cap=1024, rel_tol=0.25)
    assert 37 * 0.75 <= loose.max_batch <= 37 < loose.first_oom <= loose.max_batch * 1.25 + 1 and len(tried) < 10
    assert tr.largest_batch(lambda b: None, cap=100)[:2] == (100, None)
    assert tr.largest_batch(lambda b: None, cap=100).stopped == "cap"
    none = tr.largest_batch(lambda b: (_ for _ in ()).throw(RuntimeError("out of memory")), cap=8)
    assert (none.max_batch, none.stopped) == (0, "oom_at_1")
    with pytest.raises(KeyError):
        tr.largest_batch(lambda b: (_ for _ in ()).throw(KeyError("bug")), cap=8)
    with pytest.raises(ValueError, match="cap must be"):
        tr.largest_batch(fits, cap=0)


def test_largest_batch_time_cap_gives_a_lower_bound():
    now = {"t": 0.0}

    def fits(b):  # each probe takes b seconds on a fake clock
        now["t"] += b
        if b > 100:
            raise RuntimeError("CUDA out of memory")

    found = tr.largest_batch(fits, cap=1024, time_cap_s=20, clock=lambda: now["t"])
    # 1+2+4 = 7 s spent; the probe of 8 would end at 15 s, the one of 16 at 31 s > 20: not started
    assert found.stopped == "time" and found.max_batch == 8 and found.first_oom is None and now["t"] == 15
    assert "lower bound" in found.note()


# --------------------------------------------------------------------------- model level: cached NSA decode, max batch
def _nsa_kernels_or_skip():
    from nsa_viz.attention import nsa_kernels_available

    if not nsa_kernels_available():
        pytest.skip("NSA kernels not installed")


def test_model_generation_under_nsa_takes_the_cached_decode_path(monkeypatch):
    """The generate rows time decode steps through nsa_decode on each layer's NSACache (one query per step,
    the compressed keys kept across steps), not a recomputation over the whole cache."""
    _nsa_kernels_or_skip()
    import nsa_viz.kernels.nsa_decode as dec

    calls, real = [], dec.nsa_decode

    def spy(q, k, v, cache, **kw):
        calls.append((q.shape[1], k.shape[1], id(cache), cache.kv_len))
        return real(q, k, v, cache, **kw)

    monkeypatch.setattr(dec, "nsa_decode", spy)
    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    rec = tr.Recorder(verbose=False)
    pattern = "nsa:block=16,top_n=4,window=32,cmp_block=16,cmp_stride=8"
    rows = tr.bench_model(rec, [pattern], loaded=(model, None), lengths=[96], gen_tokens=3, accuracy=False,
                          model_name="tiny", **FAST)
    gen = {r["op"]: r for r in rows if r["pass"] == "generate"}
    assert gen["nsa"]["status"] == "ok" and "cached decode (nsa_decode on each layer's NSACache)" in gen["nsa"]["note"]
    assert "NSA steps" not in gen["dense"]["note"] and {r["model"] for r in rows} == {"tiny"}
    steps = [c for c in calls if c[0] == 1]
    prefills = [c for c in calls if c[0] == c[1]]
    assert prefills and steps and len(calls) == len(steps) + len(prefills)
    # within one generation, each layer's cache follows the sequence one token at a time
    run = calls[-(layers * 4):]  # the last generation: a prefill then 3 steps, every layer
    by_cache = {}
    for tq, tk, cid, seen in run:
        by_cache.setdefault(cid, []).append((tq, tk, seen))
    assert len(by_cache) == layers
    for seq in by_cache.values():
        assert [(tq, tk) for tq, tk, _ in seq] == [(96, 96), (1, 97), (1, 98), (1, 99)]
        assert [seen for _, _, seen in seq[1:]] == [96, 97, 98]  # the cache is extended, never rebuilt


def test_max_batch_rows_on_cpu_record_probes_and_oom(monkeypatch):
    model = tiny_model("llama")
    rec = tr.Recorder(verbose=False)
    entries = tr._entries(rec, ["window:window=32"], "model", tr.Entry(None, "dense", "hf", "dense (sdpa)", {}))
    fields = lambda e, pass_=None, **x: {**e.fields(), "level": "model", "pass": pass_, **x}  # noqa: E731
    tr.bench_max_batch(rec, entries, model, fields=fields, lengths=[64], device="cpu", cap=4, time_cap_s=30)
    rows = {r["op"]: r for r in rec.rows}
    assert [rows[o]["max_batch"] for o in ("dense", "sliding_window")] == [4, 4]
    assert all(r["status"] == "ok" and "probes 1, 2, 4" in r["note"] and "bounded by the cap" in r["note"]
               for r in rows.values())
    real = tr._prefill

    def small_memory(model, ids):  # a device that holds at most 5 sequences
        if ids.shape[0] > 5:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(model, ids)

    monkeypatch.setattr(tr, "_prefill", small_memory)
    rec2 = tr.Recorder(verbose=False)
    tr.bench_max_batch(rec2, entries[:1], model, fields=fields, lengths=[64], device="cpu", cap=64, time_cap_s=30)
    (row,) = rec2.rows
    assert row["max_batch"] == 5 and "limit in [5, 6)" in row["note"] and "8 oom" in row["note"]
    monkeypatch.setattr(tr, "_prefill", lambda model, ids: (_ for _ in ()).throw(RuntimeError("out of memory")))
    rec3 = tr.Recorder(verbose=False)
    tr.bench_max_batch(rec3, entries[:1], model, fields=fields, lengths=[64], device="cpu", cap=64)
    assert (rec3.rows[0]["status"], rec3.rows[0]["max_batch"]) == ("oom", 0)


def test_a_model_that_cannot_load_falls_back_to_random_weights_when_asked(monkeypatch):
    def load(model, device, dtype=None, random_weights=False):
        if not random_weights:
            raise ImportError("Loading a GGUF checkpoint in PyTorch requires the gguf package")
        return tiny_model("llama"), None

    monkeypatch.setattr(tr, "load_bench_model", load)
    common = dict(model="/tmp/smollm2.gguf", model_name=tr.DEFAULT_MODEL, lengths=[32], gen_tokens=0, accuracy=False, **FAST)
    rows = tr.bench_model(tr.Recorder(verbose=False), [], **common)
    assert [(r["pass"], r["status"]) for r in rows] == [("prefill", "failed")] and "gguf" in rows[0]["note"]
    rows = tr.bench_model(tr.Recorder(verbose=False), [], fallback_random_weights=True, **common)
    assert rows[0]["status"] == "failed" and rows[0]["model"] == tr.DEFAULT_MODEL
    assert rows[1]["status"] == "ok" and rows[1]["pass"] == "prefill"
    assert rows[1]["model"] == tr.DEFAULT_MODEL + " (random weights)"


def test_time_budget_records_what_was_not_measured_as_skipped():
    import time as _time

    rec = tr.Recorder(verbose=False)
    model = tiny_model("llama")
    past = _time.perf_counter() - 1
    tr.bench_kernels(rec, ["window:window=32"], [64], q_heads=4, kv_heads=2, head_dim=32, passes=("fwd",),
                     deadline=past, **FAST)
    tr.bench_model(rec, ["window:window=32"], loaded=(model, None), lengths=[64], gen_tokens=2, accuracy=True,
                   random_weights=True, max_batch_lengths=[64], deadline=past, **FAST)
    status = {(r["level"], r["pass"]): r["status"] for r in rec.rows}
    assert status == {("kernel", "fwd"): "skipped", ("model", "prefill"): "skipped", ("model", "generate"): "skipped",
                      ("model", "max_batch"): "skipped",
                      # random weights: accuracy is unsupported whatever the time
                      ("model", "accuracy"): "unsupported", ("model", "passkey"): "unsupported"}
    assert all("time budget" in r["note"] for r in rec.rows if r["status"] == "skipped")
    df = tr.add_derived(rec.rows)
    assert df["speedup_vs_dense"].isna().all() and "skipped" in tr.summary_text(df)


# --------------------------------------------------------------------------- ratios, crossovers, Pareto
def test_ratios_use_the_dense_baseline_of_the_same_run_and_shape():
    rows = [
        _row("A", "dense", 1024, 10.0, base=True, peak_mem_mb=100.0),
        _row("A", "sliding_window", 1024, 5.0, peak_mem_mb=50.0),
        _row("B", "dense", 1024, 40.0, base=True, peak_mem_mb=100.0),
        _row("B", "sliding_window", 1024, 5.0, peak_mem_mb=80.0),
        _row("B", "sliding_window", 2048, 5.0),           # no dense at 2048 in run B: no ratio
        _row("C", "sliding_window", 1024, 5.0),           # run C has no baseline at all
        _row("A", "dense", 1024, 99.0, base=True, pass_="fwd_bwd", status="failed"),
        _row("A", "sliding_window", 1024, 9.0, pass_="fwd_bwd"),  # its baseline failed: no ratio
    ]
    df = tr.add_derived(rows).set_index(["run_id", "op", "T", "pass"])
    assert df.loc[("A", "sliding_window", 1024, "fwd"), "speedup_vs_dense"] == pytest.approx(2.0)
    assert df.loc[("B", "sliding_window", 1024, "fwd"), "speedup_vs_dense"] == pytest.approx(8.0)
    assert df.loc[("A", "sliding_window", 1024, "fwd"), "mem_vs_dense"] == pytest.approx(0.5)
    assert df.loc[("B", "sliding_window", 1024, "fwd"), "mem_vs_dense"] == pytest.approx(0.8)
    assert df.loc[("A", "dense", 1024, "fwd"), "speedup_vs_dense"] == pytest.approx(1.0)
    for key in [("B", "sliding_window", 2048, "fwd"), ("C", "sliding_window", 1024, "fwd"),
                ("A", "sliding_window", 1024, "fwd_bwd")]:
        assert df.loc[key, "speedup_vs_dense"] is None or math.isnan(df.loc[key, "speedup_vs_dense"])


def test_throughput_ratio_and_ppl_delta_against_dense():
    common = dict(level="model", model="m", HQ=9, HKV=3, D=64)
    rows = [
        _row("A", "dense", 512, None, base=True, pass_="prefill", tokens_per_s=1000.0, **common),
        _row("A", "sliding_window", 512, None, pass_="prefill", tokens_per_s=1500.0, **common),
        _row("A", "dense", 512, None, base=True, pass_="accuracy", ppl=10.0, density=1.0, kl=0.0, **common),
        _row("A", "sliding_window", 512, None, pass_="accuracy", ppl=12.5, density=0.3, kl=0.2, **common),
    ]
    df = tr.add_derived(rows).set_index(["op", "pass"])
    assert df.loc[("sliding_window", "prefill"), "speedup_vs_dense"] == pytest.approx(1.5)
    assert df.loc[("sliding_window", "accuracy"), "ppl_delta"] == pytest.approx(2.5)


def test_crossover_is_log_interpolated_and_requires_winning_from_there_on():
    Ts = [1024, 2048, 4096, 8192]
    rows = []
    for T, sp_a, sp_b, sp_c in zip(Ts, [0.5, 0.8, 1.25, 2.0], [1.1, 0.9, 1.2, 1.5], [0.3, 0.4, 0.5, 0.6]):
        rows.append(_row("R", "dense", T, 10.0, base=True))
        rows.append(_row("R", "a", T, 10.0 / sp_a))
        rows.append(_row("R", "b", T, 10.0 / sp_b))
        rows.append(_row("R", "c", T, 10.0 / sp_c))
    df = tr.add_derived(rows)
    cross = df.groupby("op")["crossover_T"].first()
    assert cross["a"] == pytest.approx(math.sqrt(2048 * 4096))  # 0.8 -> 1.25 is symmetric in log
    assert 2048 < cross["b"] < 4096  # the win at 1024 does not count: it loses again at 2048
    assert cross["c"] is None or math.isnan(cross["c"])
    table = tr.crossover_table(rows).set_index("op")
    assert table.loc["a", "speedup_at_T_max"] == pytest.approx(2.0) and table.loc["a", "T_min"] == 1024


def test_pareto_front_on_density_and_kl():
    common = dict(level="model", pass_="accuracy", model="m")
    rows = [_row("R", "dense", 512, None, base=True, density=1.0, kl=0.0, **common),
            _row("R", "w128", 512, None, density=0.3, kl=0.10, **common),
            _row("R", "w64", 512, None, density=0.2, kl=0.30, **common),
            _row("R", "dilated", 512, None, density=0.35, kl=0.40, **common)]  # denser and worse than w128
    df = tr.add_derived(rows).set_index("op")
    assert df["pareto"].to_dict() == {"dense": True, "w128": True, "w64": True, "dilated": False}


# --------------------------------------------------------------------------- tables on disk
@pytest.mark.parametrize("fmt", tr.FORMATS)
def test_append_rows_keeps_earlier_runs_and_round_trips(tmp_path, fmt):
    path = tmp_path / f"tradeoffs_cpu.{fmt}"
    run1 = [_row("A", "dense", 64, 1.0, base=True, params={}), _row("A", "w", 64, 2.0, params={"window": 32})]
    run2 = [_row("B", "dense", 64, 3.0, base=True, params={}), _row("B", "w", 64, float("nan"), status="failed",
                                                                    note="RuntimeError: boom", params={"window": 32})]
    tr.append_rows(tr._to_records(tr.add_derived(run1)), path)
    tr.append_rows(tr._to_records(tr.add_derived(run2)), path)
    df = tr.read_table(path)
    assert list(df.columns[: len(tr.COLUMNS)]) == tr.COLUMNS and len(df) == 4
    assert list(df["run_id"]) == ["A", "A", "B", "B"]
    assert df.loc[1, "params"] == {"window": 32} and df.loc[1, "speedup_vs_dense"] == pytest.approx(0.5)
    assert df.loc[3, "status"] == "failed" and df.loc[3, "note"] == "RuntimeError: boom"
    assert df.loc[3, "ms"] is None or math.isnan(df.loc[3, "ms"])
    both = tr.read_table(tmp_path)  # a folder: every tradeoffs table in it
    assert len(both) == 4
    if fmt == "json":  # plain JSON list of objects, no NaN tokens
        data = json.loads(path.read_text())
        assert isinstance(data, list) and data[3]["ms"] is None


def test_read_table_errors(tmp_path):
    with pytest.raises(ValueError, match="no results table"):
        tr.read_table(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="must end in one of"):
        tr.append_rows([], tmp_path / "x.txt")


def test_cpu_peak_memory_sees_an_allocation():
    # In a fresh process: after hundreds of tests this one's freed memory can serve the allocation
    # without raising the resident set, which hides it from a process-level peak.
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from nsa_viz import tradeoffs as tr\n"
        "def alloc():\n"
        "    x = torch.ones(64 * 2**20 // 4)\n"
        "    return float(x[-1])\n"
        "mem = tr.peak_memory(alloc, 'cpu')\n"
        "assert mem.kind == 'cpu_process_peak_rss' and mem.delta_mb > 48 and mem.peak_mb > mem.delta_mb, mem\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_benchmarks_common_shares_the_package_helpers():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
    spec = importlib.util.spec_from_file_location("bench_common_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.environment is tr.environment and mod.bench_ms is tr.bench_ms and mod.write_rows is tr.write_rows
    assert mod.bench_ms(lambda: torch.ones(8).sum(), 1, 2) > 0


# --------------------------------------------------------------------------- figures from a saved table
def test_figures_build_from_a_saved_table(tmp_path):
    from nsa_viz import plots_tradeoffs as plots

    rows = []
    for T, sp in zip([1024, 2048, 4096], [0.5, 1.5, 3.0]):
        rows += [_row("R", "dense", T, 10.0, base=True, peak_mem_mb=100.0 * T / 1024, device="GPU X"),
                 _row("R", "sliding_window", T, 10.0 / sp, peak_mem_mb=60.0 * T / 1024, device="GPU X"),
                 _row("R", "custom", T, None, status="failed", note="boom", device="GPU X")]
    acc = dict(level="model", pass_="accuracy", model="m", device="GPU X")
    rows += [_row("R", "dense", 512, None, base=True, density=1.0, kl=0.0, top1_agree=1.0, **acc),
             _row("R", "sliding_window", 512, None, density=0.3, kl=0.1, top1_agree=0.9, **acc)]
    path = tr.append_rows(tr._to_records(tr.add_derived(rows)), tmp_path / "tradeoffs_x.csv")
    saved = tr.read_table(path)

    fig = plots.time_vs_length(saved, "fwd")
    names = [t.name for t in fig.data]
    assert names[0] == "dense (sdpa)" and "sliding_window" in names and "custom" not in names
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    expected = 1024 * 2 ** (math.log(2.0) / math.log(3.0))  # 0.5x at 1024 -> 1.5x at 2048, log-log
    assert any(f"beats dense from T≈{expected:,.0f}" in a.text for a in fig.layout.annotations)
    assert "3 configuration(s) failed" in fig.layout.title.text and "GPU X" in fig.layout.title.text
    mem = plots.memory_vs_length(saved, "fwd")
    assert "peak memory" in mem.layout.yaxis.title.text
    accf = plots.accuracy_vs_density(saved, "kl")
    assert [t.name for t in accf.data] == ["patterns", "Pareto front"] and len(accf.data[1].x) == 2
    figs = plots.tradeoff_figures(saved)
    assert set(figs) == {"time_fwd", "accuracy_kl", "accuracy_top1"}
    with pytest.raises(ValueError, match="no kernel-level rows with pass='decode'"):
        plots.time_vs_length(saved, "decode")
    with pytest.raises(ValueError, match="metric must be one of"):
        plots.accuracy_vs_density(saved, "bleu")


def test_max_batch_figure_from_rows():
    from nsa_viz import plots_tradeoffs as plots

    mb = dict(level="model", pass_="max_batch", model="m", device="GPU X")
    rows = [_row("R", "dense", 8192, None, base=True, max_batch=300, note="limit in [300, 330)", **mb),
            _row("R", "nsa", 8192, None, max_batch=150, note="time cap hit: 150 is a lower bound", **mb)]
    fig = plots.max_batch_bars(tr.add_derived(rows))
    assert list(fig.data[0].y) == [300, 150] and fig.data[0].text[1] == "≥150 (0.50× dense)"
    assert "max_batch" in plots.tradeoff_figures(rows) and "T=8192" in fig.layout.title.text


# --------------------------------------------------------------------------- the CLI end to end
def _tiny_model_dir(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["the pass key is 12345. remember it. " * 20, "def f(x):\n    return x\n" * 20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    model = tiny_model("llama", vocab_size=320, max_position_embeddings=4096)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_cli_quick_end_to_end_on_a_tiny_random_model(tmp_path, capsys):
    from nsa_viz.cli import main

    folder = _tiny_model_dir(tmp_path)
    out = tmp_path / "results" / "tradeoffs_cpu.json"
    argv = ["bench", "--quick", "--model", str(folder), "--patterns", "window:window=32", "bogus:x=1",
            "--lengths", "64", "128", "--model-lengths", "64", "192", "--q-heads", "4", "--kv-heads", "2",
            "--head-dim", "32", "--warmup-ms", "1", "--rep-ms", "3", "--gen-tokens", "2", "--eval-tokens", "192",
            "--passkey-prompts", "2", "--out", str(out), "--figures", str(tmp_path / "figs"), "--no-progress",
            "--max-batch-lengths", "64", "--max-batch-cap", "2", "--model-name", "tiny-llama", "--time-budget-s", "900"]
    assert main(argv) == 0
    df = tr.read_table(out)
    assert df["run_id"].nunique() == 1 and set(df["mode"]) == {"quick"}
    ok = df[df["status"] == "ok"]
    assert set(ok["level"]) >= {"kernel", "model"}
    assert set(ok[ok["level"] == "model"]["pass"]) == {"prefill", "generate", "accuracy", "passkey", "max_batch"}
    assert set(df[df["level"] == "model"]["model"]) == {"tiny-llama"}
    assert set(ok[ok["pass"] == "max_batch"]["max_batch"]) == {2}
    speed = ok[ok["pass"].isin(tr.SPEED_PASSES)]
    assert (speed[speed["level"] == "model"]["tokens_per_s"] > 0).all() and speed["speedup_vs_dense"].notna().all()
    bad = df[df["op"] == "bogus:x=1"]
    assert len(bad) == 1 and bad.iloc[0]["status"] == "unsupported" and "pattern name must be one of" in bad.iloc[0]["note"]
    # accuracy against dense on the same tokens; a passkey prompt longer than 64 tokens is recorded, not fatal
    acc = ok[ok["pass"] == "accuracy"].set_index(["pattern", "T"])
    dense = acc[acc["is_baseline"].astype(bool)]
    assert (dense["kl"] == 0).all() and (dense["top1_agree"] == 1).all() and (dense["ppl_delta"] == 0).all()
    win = acc.loc[("SlidingWindow(window=32, causal=True)", 192)]
    assert win["kl"] > 0 and win["density"] < 0.5 and win["n_eval"] == 191 and win["dataset"] == "pydoc_data.topics"
    passkey = df[df["pass"] == "passkey"].set_index("T")
    assert set(passkey.loc[64, "status"]) == {"unsupported"} and "too short" in passkey.loc[64, "note"].iloc[0]
    assert set(passkey.loc[192, "status"]) == {"ok"} and set(passkey.loc[192, "n_eval"]) == {2}
    printed = capsys.readouterr().out
    assert "crossover" in printed and str(out) in printed
    assert (tmp_path / "figs" / "time_fwd.html").exists()
    again = ["bench", "--quick", "--levels", "kernel", "--patterns", "window:window=32", "--lengths", "64", "--passes",
             "fwd", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "32", "--warmup-ms", "1", "--rep-ms", "3",
             "--out", str(out), "--no-progress"]
    assert main(again) == 0  # a second run appends
    assert tr.read_table(out)["run_id"].nunique() == 2 and len(tr.read_table(out)) == len(df) + 2
