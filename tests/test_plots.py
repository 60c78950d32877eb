"""nsa_viz.plots: figures build from small tables and arrays, draw what they are given, and refuse bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from nsa_viz import plots
from nsa_viz.dashboard.compute import benchmark_table


def _traces(fig, kind):
    return [t for t in fig.data if t.type == kind]


def test_layout_over_mass_splits_kept_and_dropped_mass():
    mass = np.tril(np.full((4, 4), 0.25))
    tiles = np.array([[1, 0, 0, 0], [2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 2, 1]])
    fig = plots.layout_over_mass(mass, tiles, block=32, title="t")
    kept, dropped = _traces(fig, "heatmap")
    kept_z, dropped_z = np.array(kept.z, dtype=float), np.array(dropped.z, dtype=float)
    # a tile is drawn in exactly one of the two maps, and only where there is mass
    assert np.isfinite(kept_z[tiles > 0]).all() and np.isnan(kept_z[tiles == 0]).all()
    assert np.isfinite(dropped_z[(tiles == 0) & (mass > 0)]).all() and np.isnan(dropped_z[tiles > 0]).all()
    assert math.isclose(kept_z[0, 0], math.log10(0.25))
    dots = _traces(fig, "scatter")[0]
    assert sorted(zip(dots.y, dots.x)) == [(i, i) for i in range(4)]  # the partial tiles
    assert fig.layout.yaxis.autorange == "reversed"


def test_layout_over_mass_without_pattern_and_with_wrong_shapes():
    fig = plots.layout_over_mass(np.eye(3), block=16)
    assert len(fig.data) == 1 and not fig.layout.showlegend
    with pytest.raises(ValueError, match="block size"):
        plots.layout_over_mass(np.eye(3), np.ones((2, 3)), block=16)
    with pytest.raises(ValueError, match="mass must be a 2-D"):
        plots.layout_over_mass(np.ones(3), block=16)


def test_recall_heatmap_pivots_layers_by_heads():
    table = pd.DataFrame([{"layer": l, "head": h, "recall": 0.1 * h + 0.01 * l} for l in (3, 0) for h in range(3)])
    fig = plots.recall_heatmap(table, title="r")
    hm = fig.data[0]
    assert list(hm.y) == ["layer 0", "layer 3"] and list(hm.x) == ["h0", "h1", "h2"]
    assert np.allclose(np.array(hm.z), [[0.0, 0.1, 0.2], [0.03, 0.13, 0.23]])
    assert hm.text[1][2] == "0.23"
    with pytest.raises(ValueError, match="recall"):
        plots.recall_heatmap(table.drop(columns="recall"))
    with pytest.raises(ValueError, match="no rows"):
        plots.recall_heatmap(table.iloc[0:0])
    with pytest.raises(TypeError):
        plots.recall_heatmap("not a table")


def test_distance_curves_one_line_per_series_on_a_log_axis():
    rows = [{"layer": l, "distance": d, "cum_mass": min(1.0, (d + 1) / 10)} for l in (0, 5) for d in range(10)]
    fig = plots.distance_curves(pd.DataFrame(rows), marks=[4])
    assert [t.name for t in fig.data] == ["layer 0", "layer 5"]
    assert fig.layout.xaxis.type == "log"
    assert list(fig.data[0].x)[:2] == [1, 2]  # distance + 1 so that distance 0 sits on the log axis
    assert len(fig.layout.shapes) == 1


def test_head_taxonomy_one_colour_band_per_class():
    rows = [{"layer": 0, "head": 0, "kind": "local"}, {"layer": 0, "head": 1, "kind": "sink"},
            {"layer": 1, "head": 0, "kind": "local"}, {"layer": 1, "head": 1, "kind": "retrieval"}]
    fig = plots.head_taxonomy(rows)
    hm = fig.data[0]
    assert list(hm.colorbar.ticktext) == ["local", "retrieval", "sink"]
    assert np.array(hm.z).tolist() == [[0, 2], [0, 1]]
    assert hm.text[1][1] == "retrieval"


def test_nsa_selection_marks_picked_blocks():
    fig = plots.nsa_selection([0.5, 0.1, 0.3, 0.1], [2.0, 0.1, 1.0, 0.5], [0, 2, -1], block=64, query_pos=250, window=64)
    bars = _traces(fig, "bar")[0]
    picked = [c for c in bars.marker.color]
    assert picked[0] == picked[2] != picked[1] == picked[3]
    assert fig.layout.yaxis2.overlaying == "y"
    with pytest.raises(ValueError, match="one value per block"):
        plots.nsa_selection([0.5, 0.5], [1.0], [0], block=64, query_pos=10)


def test_highlighted_tokens_escape_text_and_mark_the_query():
    tokens = ["<script>", " a", " b", " c"]
    html_text = plots.highlighted_tokens_html(tokens, query=2, selected=[True, False, False, False],
                                              window=[False, True, True, False], weights=[0.5, 0.2, 0.3, 0.0])
    assert "<script>" not in html_text and "&lt;script&gt;" in html_text
    assert html_text.count("outline:2px solid") == 2  # the legend's query sample and the query itself
    assert "color:#bbb" in html_text  # the future token is greyed out
    assert "dense p=0.5000" in html_text
    with pytest.raises(ValueError, match="query"):
        plots.highlighted_tokens_html(tokens, query=4)
    short = plots.highlighted_tokens_html(tokens, query=3, max_tokens=2)
    assert "2 earlier tokens" in short


def _bench_rows():
    base = dict(device="GPU X", B=1, HKV=4, D=128, dtype="bfloat16", HQ=64, params={}, peak_mem_mb=None, note="")
    rows = []
    for T, dense_ms in ((1024, 2.0), (4096, 8.0)):
        rows.append({**base, "op": "dense", "impl": "sdpa_flash", "pass": "fwd", "T": T, "ms": dense_ms * 1.5})
        rows.append({**base, "op": "dense", "impl": "sdpa_cudnn", "pass": "fwd", "T": T, "ms": dense_ms})
        rows.append({**base, "op": "sliding_window", "impl": "nsa_viz", "pass": "fwd", "T": T, "ms": 99.0,
                     "params": {"window": 512}})
        # a later run of the same measurement: this one counts
        rows.append({**base, "op": "sliding_window", "impl": "nsa_viz", "pass": "fwd", "T": T, "ms": dense_ms / 4,
                     "params": {"window": 512}})
    rows.append({**base, "HQ": 9, "HKV": 3, "D": 64, "op": "dense", "impl": "sdpa_flash", "pass": "fwd", "T": 1024,
                 "ms": 1.0})
    return rows


def test_benchmark_speed_from_a_results_file(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_bench_rows()))
    table = benchmark_table([path])
    sw = table[(table["op"] == "sliding_window")].sort_values("T")
    assert sw["ms"].tolist() == [0.5, 2.0]  # the later duplicate replaced the earlier one
    assert sw["speedup_vs_dense"].tolist() == pytest.approx([4.0, 4.0])  # against the fastest dense SDPA
    assert sw["series"].iloc[0] == "SlidingWindow(window=512) [nsa_viz]"
    with pytest.raises(ValueError, match="several shapes"):
        plots.benchmark_speed(table, pass_="fwd")
    shape = "B=1, 64/4 heads, d=128, bfloat16"
    fig = plots.benchmark_speed(table, pass_="fwd", value="speedup_vs_dense", shape=shape, title="x")
    assert "GPU X" in fig.layout.title.text and shape in fig.layout.title.text
    assert {t.name for t in fig.data} == {"Dense() [sdpa_cudnn]", "Dense() [sdpa_flash]",
                                          "SlidingWindow(window=512) [nsa_viz]"}
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    with pytest.raises(ValueError, match="no rows"):
        plots.benchmark_speed(table, pass_="decode", shape=shape)


def test_benchmark_table_refuses_unreadable_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        benchmark_table([bad])
    assert benchmark_table([]).empty


def test_tradeoff_figures_are_re_exported():
    from nsa_viz import plots_tradeoffs

    assert plots.tradeoff_figures is plots_tradeoffs.tradeoff_figures
    assert plots.accuracy_vs_density is plots_tradeoffs.accuracy_vs_density
