"""benchmarks/plot_nsa.py: both SVG figures from a made-up result file, and clear errors for wrong files."""
import importlib.util
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_nsa.py"
SVG = "{http://www.w3.org/2000/svg}"


def _load_script():
    spec = importlib.util.spec_from_file_location("plot_nsa", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the file executes
    spec.loader.exec_module(module)
    return module


plot_nsa = _load_script()


def _row(op, impl, T, pass_, ms, note="[run 5]", combine=None, granularity=None):
    params = {"top_n": 16, "block": 64, "window": 512, "cmp_block": 32, "cmp_stride": 16}
    if combine:
        params.update(combine=combine, granularity=granularity)
    return {"device": "Made-up GPU", "dtype": "bfloat16", "B": 1, "op": op, "impl": impl, "HQ": 64, "HKV": 4,
            "D": 128, "T": T, "pass": pass_, "ms": ms, "params": params, "note": note}


SIX_ROWS = [
    _row("dense", "sdpa_cudnn", 8192, "fwd_bwd", 8.0, note="[run 4]"),
    _row("dense", "sdpa_cudnn", 16384, "fwd_bwd", 30.0),
    _row("nsa", "nsa_viz", 8192, "fwd_bwd", 10.0, "[run 4: packed importance before its fix (slow)]", "union", "token"),
    _row("nsa", "nsa_viz", 16384, "fwd_bwd", 15.0, "[run 5]", "union", "token"),
    _row("decode", "sdpa_cudnn", 8192, "decode", 0.02),
    _row("decode", "nsa_viz_cudagraph", 8192, "decode", 0.06),
]


def _parse(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == SVG + "svg" and root.get("viewBox")
    return root


def test_both_figures_from_six_rows(tmp_path):
    results = tmp_path / "nsa_made_up.json"  # the figures are named after it
    results.write_text(json.dumps(SIX_ROWS))
    done = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), "--out", str(tmp_path / "figs")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    times = _parse(tmp_path / "figs" / "nsa_made_up.svg")
    lines = times.iter(SVG + "polyline")
    # fwd panel: nothing; fwd+bwd: dense and union/token; decode: dense and CUDA graph
    assert sorted(p.get("data-label") for p in lines) == sorted(
        ["dense SDPA cuDNN", "ours union / token", "dense SDPA cuDNN", "ours nsa_decode (union/token, one CUDA graph)"])
    hollow = [e for e in times.iter() if "hollow" in (e.get("class") or "")]
    assert len(hollow) == 2  # the pre-fix 8k point and its legend key
    caption = " ".join(e.text for e in times.iter(SVG + "text") if e.get("class") == "caption")
    assert "Made-up GPU" in caption and "before its fix" in caption and "n=16" in caption and "w=512" in caption

    gqa = _parse(tmp_path / "figs" / "nsa_gqa_made_up.svg")
    (line,) = gqa.iter(SVG + "polyline")  # 64/4/128 union/token: dense / ours at 8k and 16k
    assert line.get("data-label") == "64/4/128" and len(line.get("points").split()) == 2
    assert len([e for e in gqa.iter(SVG + "line") if e.get("class") == "reference"]) == 2  # 1x in both panels


def test_newest_run_wins_else_the_first():
    old, new, other = (_row("dense", "sdpa_cudnn", 8192, "fwd", ms, note) for ms, note in
                       ((1.0, "[run 4]"), (2.0, "[run 5]"), (3.0, "[run 3]")))
    assert plot_nsa.pick_rows([old, new, other])[plot_nsa.row_key(old)]["ms"] == 2.0
    assert plot_nsa.pick_rows([old, other])[plot_nsa.row_key(old)]["ms"] == 1.0


@pytest.mark.parametrize("content, words", [
    ("", "is empty"),
    ("not json", "is not JSON"),
    ('{"rows": []}', "holds dict"),
    ("[]", "holds list"),
    ('[{"op": "dense"}]', "lacks impl"),
])
def test_wrong_files_give_a_clear_error(tmp_path, content, words):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=words):
        plot_nsa.load_rows(path)


def test_rows_of_another_benchmark_are_refused(tmp_path):
    rows = [dict(_row("block_sparse", "triton", 8192, "fwd", 1.0))]
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="no NSA benchmark rows"):
        plot_nsa.write_figures(path, tmp_path / "out")
    done = subprocess.run([sys.executable, str(SCRIPT), "--results", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no NSA benchmark rows" in done.stderr
