"""Accuracy tables: perplexity, KL and agreement against a direct computation; passkey prompts and scoring."""
from __future__ import annotations

import math

import pytest
import torch

from nsa_viz.accuracy import passkey_correct, passkey_prompt, passkey_table, perplexity_table
from nsa_viz.patterns import Dense, SlidingWindow

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


def test_passkey_prompt_layout(char_tokenizer):
    filler = char_tokenizer(TEXT * 20).input_ids
    p = passkey_prompt(char_tokenizer, 700, 0.25, seed=3, filler_ids=filler)
    ids = p["input_ids"][0].tolist()
    assert len(ids) == 700
    assert bytes(ids[-p["answer_len"]:]).decode() == " " + p["key"] and len(p["key"]) == 5
    needle = bytes(ids[p["needle_pos"]:p["needle_pos"] + 40]).decode()
    assert f"The pass key is {p['key']}" in needle
    again = passkey_prompt(char_tokenizer, 700, 0.25, seed=3, filler_ids=filler)
    assert torch.equal(again["input_ids"], p["input_ids"])
    deeper = passkey_prompt(char_tokenizer, 700, 0.75, seed=3, filler_ids=filler)
    assert deeper["needle_pos"] > p["needle_pos"]
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(char_tokenizer, 700, 1.5, seed=0, filler_ids=filler)
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(char_tokenizer, 50, 0.5, seed=0, filler_ids=filler)


def test_passkey_table_tiny(tiny_llama, char_tokenizer):
    df = passkey_table(tiny_llama, char_tokenizer, {"model": None, "dense": Dense()}, lengths=(300,),
                       depths=(0.2, 0.8), trials=2, filler=TEXT * 10, progress=False)
    assert len(df) == 8 and set(df.columns) >= {"pattern", "length", "depth", "trial", "key", "distance", "correct"}
    a, b = df[df.pattern == "model"], df[df.pattern == "dense"]
    assert a.correct.tolist() == b.correct.tolist() and a.key.tolist() == b.key.tolist()


@pytest.mark.slow
def test_smollm2_passkey_dense_finds_it_window_does_not(smollm2):
    """At 640 tokens with the needle early, SmolLM2 retrieves the key; a 64-token window cannot see it."""
    model, tok = smollm2
    df = passkey_table(model, tok, {"model": None, "window64": SlidingWindow(64)}, lengths=(640,), depths=(0.2,),
                       trials=1, progress=False)
    got = dict(zip(df.pattern, df.correct))
    assert got == {"model": True, "window64": False}
