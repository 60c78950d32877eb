"""Accuracy tables: perplexity, KL and agreement against a direct computation; passkey prompts and scoring."""
from __future__ import annotations

import math

import pytest
import torch

from nsa_viz.accuracy import answer_correct, passkey_table, perplexity_table, retrieval_prompts
from nsa_viz.data import from_texts
from nsa_viz.patterns import NSA, Dense, SlidingWindow

TEXT = "def add(a, b):\n    return a + b\n\n" * 8 + "The quick brown fox jumps over the lazy dog. " * 6


def test_perplexity_table_against_direct_computation(tiny_llama, char_tokenizer):
    pats = {"model": None, "dense": Dense(), "win8": SlidingWindow(8)}
    df = perplexity_table(tiny_llama, char_tokenizer, {"mixed": TEXT}, pats, lengths=(100, 200), chunk=64,
                          progress=False)
    assert list(df.columns) == ["text", "length", "pattern", "tokens", "nll", "ppl", "dense_ppl", "ppl_ratio",
                                "kl_vs_dense", "top1_agree", "seconds"]
    assert len(df) == 6
    ids = char_tokenizer(TEXT, return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        logits = tiny_llama(ids).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    row = df[(df.length == 200) & (df.pattern == "model")].iloc[0]
    assert row.tokens == 199 and row.kl_vs_dense == 0 and row.top1_agree == 1
    assert math.isclose(row.nll, nll, rel_tol=1e-5) and math.isclose(row.ppl, math.exp(nll), rel_tol=1e-5)
    dense = df[(df.length == 200) & (df.pattern == "dense")].iloc[0]
    assert abs(dense.kl_vs_dense) < 1e-6 and dense.top1_agree == 1 and math.isclose(dense.ppl_ratio, 1, rel_tol=1e-5)
    win = df[(df.length == 200) & (df.pattern == "win8")].iloc[0]
    # KL(dense || window) by brute force from full logits
    with torch.no_grad():
        from nsa_viz.models import apply_pattern
        with apply_pattern(tiny_llama, SlidingWindow(8)):
            wl = tiny_llama(ids).logits[0, :-1].double()
    lp0, lp = torch.log_softmax(logits, -1), torch.log_softmax(wl, -1)
    kl = (lp0.exp() * (lp0 - lp)).sum(-1).mean().item()
    assert win.kl_vs_dense > 1e-4 and math.isclose(win.kl_vs_dense, kl, rel_tol=1e-3)
    assert math.isclose(win.top1_agree, (lp.argmax(-1) == lp0.argmax(-1)).double().mean().item())


def test_perplexity_table_bad_inputs(tiny_llama, char_tokenizer):
    with pytest.raises(ValueError, match="fewer than length"):
        perplexity_table(tiny_llama, char_tokenizer, {"short": "abc"}, {"d": Dense()}, lengths=100, progress=False)
    with pytest.raises(ValueError, match="lengths"):
        perplexity_table(tiny_llama, char_tokenizer, [TEXT], [Dense()], lengths=(1,), progress=False)
    with pytest.raises(ValueError, match="empty"):
        perplexity_table(tiny_llama, char_tokenizer, [TEXT], {}, progress=False)


def test_perplexity_table_takes_token_ids(tiny_llama, char_tokenizer):
    ids = char_tokenizer(TEXT, return_tensors="pt").input_ids
    a = perplexity_table(tiny_llama, char_tokenizer, {"t": TEXT}, {"model": None}, lengths=120, progress=False)
    b = perplexity_table(tiny_llama, char_tokenizer, {"t": ids[0]}, {"model": None}, lengths=120, progress=False)
    assert a.nll.tolist() == b.nll.tolist()
    with pytest.raises(ValueError, match="one sequence"):
        perplexity_table(tiny_llama, char_tokenizer, {"t": ids.repeat(2, 1)}, {"model": None}, lengths=120,
                         progress=False)


@pytest.mark.parametrize("task", ["passkey", "needle", "multikey"])
def test_retrieval_prompts_layout(char_tokenizer, task):
    """Prompts from nsa_viz.data's tasks: exact length plus the answer, the fact where meta says, seeded."""
    filler = from_texts([TEXT * 20])
    ps = retrieval_prompts(char_tokenizer, task, lengths=(700,), depths=(0.25, 0.75), trials=2, seed=3, filler=filler)
    assert len(ps) == (2 if task == "multikey" else 4)
    for p in ps:
        ids = p["input_ids"][0].tolist()
        assert len(ids) == 700 + p["answer_len"] and p["length"] == 700
        assert bytes(ids[-p["answer_len"]:]).decode() == " " + p["answer"]
        fact = bytes(ids[p["needle_pos"]:p["needle_pos"] + 60]).decode()
        assert p["answer"] in fact and p["distance"] == 700 - p["needle_pos"]
    if task != "multikey":
        assert [p["depth"] for p in ps] == ([0.25, 0.75, 0.25, 0.75] if task == "passkey" else [0.25, 0.25, 0.75, 0.75])
        deep = {p["depth"]: p["needle_pos"] for p in ps if p["trial"] == 0}
        assert deep[0.75] > deep[0.25]
    again = retrieval_prompts(char_tokenizer, task, lengths=(700,), depths=(0.25, 0.75), trials=2, seed=3, filler=filler)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(ps, again))
    with pytest.raises(ValueError, match="task"):
        retrieval_prompts(char_tokenizer, "riddle", lengths=(700,), filler=filler)
    with pytest.raises(ValueError, match="too short"):
        retrieval_prompts(char_tokenizer, task, lengths=(50,), filler=filler)


def test_passkey_table_tiny(tiny_llama, char_tokenizer):
    df = passkey_table(tiny_llama, char_tokenizer, {"model": None, "dense": Dense()}, lengths=(400,),
                       depths=(0.2, 0.8), trials=2, filler=from_texts([TEXT * 10]), progress=False)
    assert len(df) == 8 and set(df.columns) >= {"pattern", "length", "depth", "trial", "key", "distance", "correct"}
    a, b = df[df.pattern == "model"], df[df.pattern == "dense"]
    assert a.correct.tolist() == b.correct.tolist() and a.key.tolist() == b.key.tolist()


def test_answer_correct_is_greedy_decoding(tiny_llama):
    """Teacher-forced check == what greedy generate produces after the prompt."""
    from tests.conftest import random_ids

    prompt = random_ids(1, 30, seed=8)
    with torch.no_grad():
        gen = tiny_llama.generate(prompt, max_new_tokens=3, do_sample=False)
    good = {"input_ids": gen, "answer_len": 3}
    bad_ids = gen.clone()
    bad_ids[0, -1] = (bad_ids[0, -1] + 1) % 128
    assert answer_correct(tiny_llama, good) and not answer_correct(tiny_llama, {"input_ids": bad_ids, "answer_len": 3})


@pytest.mark.slow
def test_smollm2_passkey_dense_finds_it_window_does_not(smollm2):
    """At 640 tokens with the key early, SmolLM2 retrieves it; a 64-token window cannot see it."""
    model, tok = smollm2
    df = passkey_table(model, tok, {"model": None, "window64": SlidingWindow(64)}, lengths=(640,), depths=(0.2,),
                       trials=1, progress=False)
    got = dict(zip(df.pattern, df.correct))
    assert got == {"model": True, "window64": False}


def test_compare_hidden_max_abs_logit_diff(tiny_llama):
    """max |Δlogit| over all positions and the vocabulary, by brute force from full logits."""
    from nsa_viz.accuracy import compare_hidden
    from nsa_viz.models import apply_pattern
    from tests.conftest import random_ids

    ids = random_ids(1, 90, seed=4)
    with torch.no_grad():
        dense = tiny_llama.model(ids).last_hidden_state
        with apply_pattern(tiny_llama, SlidingWindow(8)):
            win = tiny_llama.model(ids).last_hidden_state
        head = tiny_llama.get_output_embeddings()
        want = (head(win) - head(dense))[:, :-1].abs().max().item()
    m = compare_hidden(tiny_llama, ids, win, dense, chunk=32)
    assert want > 1e-3 and math.isclose(m["max_abs_logit_diff"], want, rel_tol=1e-6)
    assert compare_hidden(tiny_llama, ids, dense, dense)["max_abs_logit_diff"] == 0


def _bench_model_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pattern", [SlidingWindow(24),
                                     NSA(block=16, top_n=3, window=32, cmp_block=16, cmp_stride=8),
                                     NSA(block=16, top_n=3, window=32, cmp_block=16, cmp_stride=8, granularity="block")],
                         ids=["window", "nsa-token", "nsa-block"])
def test_masked_sdpa_execution_equals_nsa_viz_path(tiny_llama, pattern):
    """bench_model's fast CPU evaluation (SDPA under the pattern's token mask) gives the nsa_viz path's outputs."""
    from nsa_viz.models import apply_pattern
    from tests.conftest import random_ids

    bm = _bench_model_script()
    ids = random_ids(1, 150, seed=5)
    with torch.no_grad(), apply_pattern(tiny_llama, pattern):
        ref = tiny_llama.model(ids).last_hidden_state
        with bm.masked_sdpa_execution():
            fast = tiny_llama.model(ids).last_hidden_state
        again = tiny_llama.model(ids).last_hidden_state  # the real path is back after the context
    dense = tiny_llama.model(ids).last_hidden_state
    assert (ref - dense).abs().max() > 1e-3  # the pattern matters at this length
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(again, ref)


def test_outside_window_picks_cover_more(tiny_llama):
    """bench_model's masked-SDPA mask under select_outside_window covers every key normal NSA covers in the
    window, and at least as many keys (no top-n slot is spent on a block the window holds)."""
    bm = _bench_model_script()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 200, 4, 32, generator=g), torch.randn(1, 200, 2, 32, generator=g)
    kw = dict(block=16, top_n=4, window=48, cmp_block=16, cmp_stride=8)
    normal = bm.pattern_token_mask(NSA(**kw), q, k, 32 ** -0.5)
    proto = bm.pattern_token_mask(NSA(**kw, select_outside_window=True), q, k, 32 ** -0.5)
    assert (proto.sum(-1) >= normal.sum(-1)).all() and (proto.sum(-1) > normal.sum(-1)).any()
    diff = torch.arange(200)[:, None] - torch.arange(200)[None, :]
    window = (diff >= 0) & (diff < 48)
    assert (proto[..., window] & normal[..., window]).all()
    assert not (proto & ~(diff >= 0)).any()  # causal
