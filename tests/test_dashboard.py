"""The dashboard without a browser: its reductions, its widgets' reactions, its worker and its launcher.

A tiny random Llama (2 layers, 4 query / 2 key-value heads) and a byte tokenizer stand in for SmolLM2,
so everything here takes seconds; the browser test drives the real thing.
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import pytest
import torch

from nsa_viz import NSA, Dilated, GlobalLocal, SlidingWindow
from nsa_viz.dashboard import compute, launch, sources
from nsa_viz.dashboard.worker import Worker
from tests.conftest import CharTokenizer, tiny_model

T = 160


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), CharTokenizer()


@pytest.fixture(scope="module")
def ids():
    return sources.sample_ids("docs", CharTokenizer(), T)[0]


@pytest.fixture(scope="module")
def dense_rec(tiny, ids):
    model, tok = tiny
    return compute.dense_capture(model, tok, ids, [0, 1], block=16)


# --------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("pattern", [SlidingWindow(40), GlobalLocal(window=24, sink=8), Dilated(stride=3, block=16, window=20)])
def test_recall_from_rows_equals_capture_compare(tiny, ids, dense_rec, pattern):
    """The rows-based recall (no forward pass) is the number capture measures through log-sum-exps."""
    model, tok = tiny
    with_compare = compute.dense_capture(model, tok, ids, [0, 1], block=16, max_rows=0, compare=[pattern])
    ours = compute.recall_from_rows(dense_rec, pattern)
    theirs = compute.recall_from_compare(with_compare, pattern.label)
    assert len(ours) == 2 * 4 and ours["rows"].eq(T).all()
    assert torch.allclose(torch.tensor(ours["recall"].values), torch.tensor(theirs["recall"].values), atol=1e-5)
    assert 0 < ours["recall"].min() and ours["recall"].max() < 1


def test_recall_on_sampled_rows_is_the_recall_of_those_queries(tiny, ids):
    model, tok = tiny
    pattern = SlidingWindow(24)
    sampled = compute.dense_capture(model, tok, ids, [1], block=16, max_rows=40, compare=[pattern])
    lr = sampled.layers[1]
    rows = lr.row_index
    assert len(rows) == 40 and int(rows[-1]) == T - 1
    expected = lr.compare_recall[pattern.label][0][:, rows].mean(-1)
    got = compute.recall_from_rows(sampled, pattern)["recall"].values
    assert torch.allclose(expected, torch.tensor(got, dtype=expected.dtype), atol=1e-5)


def test_block_share_and_distance_table(dense_rec):
    lr = dense_rec.layers[0]
    share = compute.block_share(lr)
    assert share.shape == (T // 16, T // 16)
    assert abs(share.sum(1) - 1).max() < 1e-5
    assert abs(share[0, 1:]).max() == 0  # causal: the first block sees nothing later
    one_head = compute.block_share(lr, head=2)
    assert abs(one_head.sum(1) - 1).max() < 1e-5
    with pytest.raises(ValueError, match="head"):
        compute.block_share(lr, head=9)
    table = compute.distance_table(dense_rec)
    for _, s in table.groupby("layer"):
        s = s.sort_values("distance")
        assert (s["cum_mass"].diff().dropna() >= -1e-6).all() and abs(s["cum_mass"].iloc[-1] - 1) < 1e-4
    per_head = compute.distance_table(dense_rec, layer=1)
    assert sorted(per_head["head"].unique()) == [0, 1, 2, 3]
    summary = compute.locality_summary(dense_rec, distances=(16, 64))
    assert (summary["within 16"] <= summary["within 64"] + 1e-6).all()


def test_nsa_views(tiny, ids, dense_rec):
    from nsa_viz.attention import nsa_kernels_available

    if not nsa_kernels_available():
        pytest.skip("NSA kernels not installed")
    model, tok = tiny
    pattern = NSA(block=16, top_n=3, window=16, cmp_block=16, cmp_stride=16, init_blocks=1, local_blocks=1)
    rec = compute.nsa_capture(model, tok, ids, [0, 1], pattern, block=16)
    view = compute.nsa_query_view(dense_rec, rec, 1, 1, T - 1, pattern)
    assert len(view["selected"]) == 3 and 0 in view["selected"] and (T - 1) // 16 in view["selected"]
    assert view["dense_mass"].shape == view["importance"].shape == (T // 16,)
    assert abs(view["dense_mass"].sum() - 1) < 1e-4
    assert view["selected_tokens"].sum() == 16 * 3 and view["window_tokens"].sum() == 16
    assert 0 < view["recall_selected"] <= view["recall"] <= 1
    tiles, density = compute.nsa_tiles(rec, 1, pattern)
    assert tiles.shape == (T // 16, T // 16) and (tiles.diagonal() > 0).all() and 0 < density < 1
    with pytest.raises(ValueError, match="head group"):
        compute.nsa_query_view(dense_rec, rec, 1, 5, 0, pattern)


def test_parse_layers_and_rows():
    assert compute.parse_layers("0, 9 ,19", 30) == [0, 9, 19]
    assert compute.parse_layers("2-4", 30) == [2, 3, 4]
    assert compute.parse_layers("all", 3) == [0, 1, 2]
    assert compute.parse_layers("-1", 30) == [29]
    for bad, msg in (("30", "lie in"), ("x", "integers"), ("", "at least one")):
        with pytest.raises(ValueError, match=msg):
            compute.parse_layers(bad, 30)
    assert compute.spread_layers(30, 4) == [0, 10, 19, 29]
    assert compute.query_rows(10, 512) == list(range(10))
    assert compute.query_rows(10, 0) == []
    assert len(compute.query_rows(5000, 512)) == 512


def test_warnings_for_patterns_that_cover_the_text():
    assert compute.warnings_for(SlidingWindow(64), 512) == []
    assert "dense attention" in compute.warnings_for(SlidingWindow(600), 512)[0]


def test_sources_name_the_bad_file(tmp_path):
    tok = CharTokenizer()
    ids, where = sources.sample_ids("legal", tok, 100)
    assert ids.shape == (1, 100) and "license" in where
    ids, where = sources.sample_ids("passkey", tok, 300)
    assert ids.shape == (1, 300) and "key" in where
    good = tmp_path / "mine.txt"
    good.write_text("hello world. " * 50)
    assert sources.sample_ids("file", tok, 64, path=str(good))[0].shape == (1, 64)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01" * 100)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for path, match in ((tmp_path / "missing.txt", "missing.txt"), (binary, "blob.bin"), (empty, "empty.txt")):
        with pytest.raises(ValueError, match=match):
            sources.sample_ids("file", tok, 64, path=str(path))
    with pytest.raises(ValueError, match="dataset must be"):
        sources.sample_ids("poetry", tok, 64)


def test_token_texts_decode_one_token_at_a_time():
    assert compute.token_texts(CharTokenizer(), torch.tensor([104, 105])) == ["h", "i"]


# --------------------------------------------------------------------------- the app, synchronously
@pytest.fixture
def app(tiny, tmp_path):
    from nsa_viz.dashboard import Dashboard

    model, tok = tiny
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    rows = [{"device": "GPU X", "op": op, "impl": impl, "pass": "fwd", "T": t, "ms": ms, "B": 1, "HQ": 8, "HKV": 2,
             "D": 64, "dtype": "bf16", "params": {}} for op, impl, t, ms in
            (("dense", "sdpa", 1024, 1.0), ("dense", "sdpa", 2048, 4.0), ("sliding_window", "nsa_viz", 1024, 0.5),
             ("sliding_window", "nsa_viz", 2048, 1.0))]
    (tmp_path / "benchmarks" / "results" / "k.json").write_text(json.dumps(rows))
    from nsa_viz import tradeoffs

    common = dict(run_id="R", device="GPU X", B=1, HQ=4, HKV=2, D=32, dtype="float32", status="ok")
    table = [{**common, "level": "kernel", "pass": "fwd", "op": op, "impl": impl, "pattern": op, "is_baseline": base,
              "T": t, "ms": ms} for t in (1024, 2048) for op, impl, base, ms in
             (("dense", "sdpa", True, 1.0 * t / 1024), ("sliding_window", "nsa_viz", False, 0.8))]
    table += [{**common, "level": "model", "pass": "accuracy", "model": "m", "op": op, "impl": "nsa_viz",
               "pattern": op, "is_baseline": op == "dense", "T": 512, "density": d, "kl": kl, "top1_agree": 1 - kl}
              for op, d, kl in (("dense", 1.0, 0.0), ("sliding_window", 0.3, 0.1))]
    tradeoffs.append_rows(table, tmp_path / "data" / "results" / "tradeoffs_test.json")
    loads = []

    def loader(name):
        loads.append(name)
        return model, tok

    a = Dashboard(loader=loader, tokens=T, block=16, results_root=tmp_path, synchronous=True)
    a.loads = loads
    return a.start()


def test_app_records_and_draws_every_panel(app):
    assert app.last_error == "" and app.message.value == ""
    assert app.state is not None and app.state["layers"] == [0, 1]
    for out in (app.out_layout, app.out_recall, app.out_distance, app.out_locality, app.out_tradeoff):
        assert len(out.outputs) == 1
        assert "application/vnd.plotly.v1+json" in out.outputs[0]["data"]
    assert "data-recall" in app.recall_summary.value
    assert app.progress.bar_style == "success"
    assert "GPU X" in json.dumps(app.out_tradeoff.outputs[0]["data"])


def test_tradeoff_panel_draws_both_kinds_of_results(app):
    sources_ = [v for _, v in app.w_t_source.options]
    assert [k for k, _ in sources_] == ["benchmarks", "tradeoffs"]
    app.w_t_source.value = sources_[1]
    views = [v for _, v in app.w_t_view.options]
    assert ("tradeoffs", "time_fwd") in views and ("tradeoffs", "accuracy_kl") in views
    for v in views:
        app.w_t_view.value = v
        assert app.message.value == "" and len(app.out_tradeoff.outputs) == 1
        assert "GPU X" in json.dumps(app.out_tradeoff.outputs[0]["data"])


def _recall(app) -> float:
    v = app.recall_summary.value
    return float(v.split('data-recall="')[1].split('"')[0])


def test_tuner_updates_live_and_returns_from_the_cache(app):
    first = _recall(app)
    layout_before = app.out_layout.outputs
    app.w_window.value = 96
    wider = _recall(app)
    assert wider > first and app.out_layout.outputs != layout_before
    hits = app.recalls.hits, app.figures.hits
    app.w_window.value = 64
    assert _recall(app) == first
    assert app.recalls.hits == hits[0] + 1 and app.figures.hits >= hits[1] + 2  # nothing recomputed
    assert app.out_layout.outputs == layout_before
    for name in ("GlobalLocal", "Dilated"):
        app.w_pattern.value = name
        assert app.message.value == "" and name in app.recall_summary.value
    app.w_tune_head.value = 1
    app.w_tune_layer.value = 0
    assert app.message.value == ""


def test_tuner_warns_about_a_window_longer_than_the_text(app):
    app.w_window.value = T + 40
    assert "at least as long as the text" in app.tune_note.value
    assert _recall(app) == pytest.approx(1.0)
    assert app.message.value == ""


def test_nsa_panels(app):
    from nsa_viz.attention import nsa_kernels_available

    app.w_pattern.value = "NSA"
    app.w_nsa_block.value = 16
    if not nsa_kernels_available():
        assert "NSA kernels" in app.tune_note.value
        return
    assert "NSA(" in app.recall_summary.value and app.message.value == ""
    app.tabs.selected_index = 3
    assert len(app.out_nsa.outputs) == 1 and "nsa-tokens" in app.nsa_tokens.value
    assert "forced_only" in app.nsa_stats.value
    app.w_x_query.value = 40
    assert app.message.value == ""
    # picks outside the window: the tuner's label says so; a window too short for the local blocks is a clear note
    app.w_nsa_outside.value = True
    assert "select_outside_window=True" in app.recall_summary.value and app.message.value == ""
    app.w_x_window.value = 16
    app.w_x_outside.value = True
    assert app.message.value == "" and "forced_only" in app.nsa_stats.value
    app.w_x_window.value = 8  # local blocks min(2, 3) of 16 tokens need a window >= 32
    assert "select_outside_window" in app.nsa_note.value


def test_audit_panel_classifies_heads_and_recommends(app, tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_VIZ_CACHE", str(tmp_path / "audit-cache"))
    app.w_audit_docs.value = 1
    app.run_audit()
    assert app.message.value == "", app.message.value
    assert app.audit_result is not None and "Recommendation" in app.recommendation.value
    assert len(app.out_taxonomy.outputs) == 1 and len(app.out_audit_recall.outputs) == 1
    first = app.recommendation.value
    app.w_audit_target.value = 0.55
    assert app.recommendation.value != first  # a lower target, a cheaper pattern
    if app.w_audit_apply.layout.display != "none":
        app._recommendation_to_tuner()
        assert app.tabs.selected_index == 2 and app.w_pattern.value == type(app.recommendation_pattern).__name__


def test_bad_input_becomes_a_message_not_a_traceback(app, tmp_path):
    app.w_dataset.value = "file"
    app.w_path.value = str(tmp_path / "nope.txt")
    app.run_capture()
    assert "nope.txt" in app.message.value and "nsa-message-error" in app.message.value
    assert "Traceback" not in app.message.value and app.progress.bar_style == "danger"
    app.w_dataset.value = "docs"
    app.w_tokens.value = 10
    app.run_capture()
    assert "at least 16" in app.message.value
    app.w_tokens.value = T
    app.w_layers.value = "7"
    app.run_capture()
    assert "lie in [0, 1]" in app.message.value
    app.w_layers.value = "0, 1"
    app.run_capture()  # the same settings as at the start: from the cache
    assert app.message.value == "" and app.captures.hits >= 1


def test_from_env_reads_the_launcher_settings(tiny, monkeypatch):
    from nsa_viz.dashboard import Dashboard

    args = argparse.Namespace(model=None, dataset="legal", file="", tokens=300, layers="0", block=16, results="")
    for k, v in launch.environment(args).items():
        if k.startswith("NSA_VIZ_DASHBOARD_"):
            monkeypatch.setenv(k, v)
    app = Dashboard.from_env(loader=lambda name: tiny, synchronous=True)
    assert (app.w_dataset.value, app.w_tokens.value, app.w_layers.value, app.w_block.value) == ("legal", 300, "0", 16)


# --------------------------------------------------------------------------- worker
def test_worker_runs_the_latest_job_of_a_name_and_reports_errors():
    ran, errors, busy = [], [], []
    w = Worker(lambda label, s: busy.append(label))
    gate = threading.Event()
    w.submit("slow", lambda: gate.wait(5), label="slow")
    time.sleep(0.2)
    for i in range(5):  # queued while "slow" runs: only the last one survives
        w.submit("tune", lambda i=i: ran.append(i))
    w.submit("bad", lambda: 1 / 0, on_error=errors.append)
    w.submit("noisy", lambda: print("progress bar text"))
    gate.set()
    assert w.wait(10)
    assert ran == [4]
    assert isinstance(errors[0], ZeroDivisionError) and "ZeroDivisionError" in w.last_traceback
    assert "progress bar text" in w.log.getvalue()
    assert busy[-1] is None and "slow" in busy


# --------------------------------------------------------------------------- launcher
def test_launcher_arguments_ports_and_notebook():
    p = argparse.ArgumentParser()
    launch.add_arguments(p)
    args = p.parse_args(["--port", "0", "--no-browser", "--tokens", "256"])
    assert args.no_browser and args.tokens == 256 and args.dataset == "docs"
    port = launch.check_port(0)
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ValueError, match="in use"):
            launch.check_port(s.getsockname()[1])
    with pytest.raises(ValueError, match="1..65535"):
        launch.check_port(70000)
    env = launch.environment(args)
    assert env["NSA_VIZ_DASHBOARD_TOKENS"] == "256" and env["HF_HUB_OFFLINE"] == "1"
    cmd = launch.server_command(launch.notebook_path(), 1234)
    assert "--Voila.ip=127.0.0.1" in cmd and "--port=1234" in cmd and "--no-browser" in cmd
    # our Voila template (no CDN stylesheets) is found through JUPYTER_PATH
    assert launch.has_template() and "--template=nsa-viz" in cmd
    assert env["JUPYTER_PATH"].split(":")[0] == str(launch.TEMPLATE_DATA_DIR)
    template = (launch.TEMPLATE_DATA_DIR / "voila" / "templates" / "nsa-viz" / "index.html.j2").read_text()
    assert "extends 'lab/index.html.j2'" in template and template.count("replace(") == 2


def test_dashboard_notebook_is_thin_and_stripped():
    import nbformat

    nb = nbformat.read(str(launch.notebook_path()), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 1 and "Dashboard.from_env().show()" in code[0].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_cli_reports_a_bad_port_without_starting_anything(capsys):
    from nsa_viz.cli import main

    assert main(["dashboard", "--port", "70000", "--no-browser"]) == 2
    assert "1..65535" in capsys.readouterr().err
