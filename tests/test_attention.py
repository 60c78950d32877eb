"""The registered "nsa_viz" attention function against plain masked softmax, on tiny random models."""
from __future__ import annotations

import pytest
import torch

from nsa_viz.attention import ATTN_NAME, nsa_kernels_available, nsa_viz_attention, register, run_pattern
from nsa_viz.models import apply_pattern, attention_modules, remove_pattern
from nsa_viz.patterns import NSA, BlockSparse, Custom, Dense, Dilated, GlobalLocal, SlidingWindow

from .conftest import random_ids, tiny_model

STATIC = [Dense(), SlidingWindow(16), Dilated(stride=2, block=16, window=8), GlobalLocal(window=16, sink=4),
          Custom(lambda q, k: (k <= q) & ((q - k) % 3 == 0), name="every3")]
needs_nsa = pytest.mark.skipif(not nsa_kernels_available(), reason="nsa_viz.kernels.nsa (NSA kernels) not landed yet")


def masked_reference(q, k, v, scale, pattern):
    """Plain softmax of q [B, HQ, Tq, D] on k, v [B, HKV, Tk, D] under pattern.mask_mod, float64."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(hq // hkv, 1).double()
    vv = v.repeat_interleave(hq // hkv, 1).double()
    qpos = torch.arange(tq)[:, None] + (tk - tq)
    kpos = torch.arange(tk)[None, :]
    mask = pattern.mask_mod(qpos, kpos)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vv).transpose(1, 2)  # [B, Tq, HQ, D]


@pytest.mark.parametrize("pattern", STATIC, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("q_len,kv_len", [(100, 100), (1, 77), (5, 130)])
def test_function_matches_masked_softmax(tiny_llama, pattern, q_len, kv_len):
    """Prefill and decode shapes (query i at position i + kv_len - q_len), GQA 4/2, fresh random inputs."""
    mod = attention_modules(tiny_llama)[0]
    g = torch.Generator().manual_seed(q_len * 1000 + kv_len)
    q = torch.randn(2, 4, q_len, 32, generator=g)
    k = torch.randn(2, 2, kv_len, 32, generator=g)
    v = torch.randn(2, 2, kv_len, 32, generator=g)
    mod._nsa_viz_spec = pattern
    try:
        out, weights = nsa_viz_attention(mod, q, k, v, None, scaling=0.3)
    finally:
        del mod._nsa_viz_spec
    assert weights is None and out.shape == (2, q_len, 4, 32)
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, 0.3, pattern), atol=2e-5, rtol=1e-4)


def test_dense_reproduces_model_logits(tiny_family):
    """Dense through nsa_viz equals the model's own sdpa logits (float32, atol 1e-5) for Llama, Qwen2, Mistral."""
    x = random_ids(2, 90)
    with torch.no_grad():
        ref = tiny_family(x).logits
        with apply_pattern(tiny_family, Dense()):
            assert tiny_family.config._attn_implementation == ATTN_NAME
            ours = tiny_family(x).logits
        after = tiny_family(x).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, ref)
    assert tiny_family.config._attn_implementation == "sdpa"


def test_pattern_changes_and_remove_restores_bitwise(tiny_llama):
    x = random_ids(1, 120)
    with torch.no_grad():
        ref = tiny_llama(x).logits
        apply_pattern(tiny_llama, SlidingWindow(8))
        changed = tiny_llama(x).logits
        remove_pattern(tiny_llama)
        back = tiny_llama(x).logits
    assert (changed - ref).abs().max() > 1e-2
    # the first 8 positions see the same keys under the window, so they must agree
    torch.testing.assert_close(changed[:, :8], ref[:, :8], atol=1e-5, rtol=1e-5)
    assert torch.equal(back, ref)
    assert not hasattr(attention_modules(tiny_llama)[0], "_nsa_viz_spec")


def test_eager_base_is_kept_for_unmapped_layers():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    x = random_ids(1, 60)
    with torch.no_grad():
        ref = model(x).logits
        with apply_pattern(model, {0: SlidingWindow(8)}):
            mixed = model(x).logits
        # layer 1 untouched, layer 0 windowed: compare with windowing layer 0 through the function's Dense path
        with apply_pattern(model, {1: None}):  # nothing applied: the eager layers through nsa_viz
            same = model(x).logits
    assert model.config._attn_implementation == "eager"
    assert torch.equal(same, ref)
    assert (mixed - ref).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", STATIC + [BlockSparse(torch.tril(torch.ones(4, 4, dtype=torch.bool)), 16, 16)],
                         ids=lambda p: type(p).__name__)
def test_generate_with_cache_equals_without(tiny_llama, pattern):
    """Decode path (T=1 queries against the cache) gives the same greedy tokens as full recomputation."""
    x = random_ids(1, 40, seed=3)
    with torch.no_grad(), apply_pattern(tiny_llama, pattern):
        cached = tiny_llama.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
        full = tiny_llama.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 46)
    assert torch.equal(cached, full)


def test_per_group_patterns(tiny_llama):
    """{layer: {kv_group: pattern}}: group 1's query heads windowed, group 0 dense."""
    mod = attention_modules(tiny_llama)[1]
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(1, 4, 50, 32, generator=g), torch.randn(1, 2, 50, 32, generator=g), torch.randn(1, 2, 50, 32, generator=g)
    mod._nsa_viz_spec = {1: SlidingWindow(5)}
    try:
        out, _ = nsa_viz_attention(mod, q, k, v, None, scaling=0.2)
    finally:
        del mod._nsa_viz_spec
    dense = masked_reference(q, k, v, 0.2, Dense())
    win = masked_reference(q, k, v, 0.2, SlidingWindow(5))
    torch.testing.assert_close(out[:, :, :2].double(), dense[:, :, :2], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, :, 2:].double(), win[:, :, 2:], atol=2e-5, rtol=1e-4)


def test_padded_batch_is_refused(tiny_llama):
    x = random_ids(2, 30)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :5] = 0
    with apply_pattern(tiny_llama, SlidingWindow(8)), torch.no_grad():
        tiny_llama(x, attention_mask=torch.ones_like(mask))  # all ones: fine
        with pytest.raises(ValueError, match="padded batches"):
            tiny_llama(x, attention_mask=mask)


def test_bad_inputs_give_clear_errors(tiny_llama):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model types"):
        apply_pattern(gpt2, Dense())
    with pytest.raises(ValueError, match="layer keys"):
        apply_pattern(tiny_llama, {5: Dense()})
    with pytest.raises(ValueError, match="head-group keys"):
        apply_pattern(tiny_llama, {0: {2: Dense()}})
    with pytest.raises(ValueError, match="causal"):
        apply_pattern(tiny_llama, SlidingWindow(8, causal=False))
    with pytest.raises(TypeError, match="Pattern"):
        apply_pattern(tiny_llama, "dense")
    with pytest.raises(ValueError, match="backend"):
        apply_pattern(tiny_llama, Dense(), backend="cuda")
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_register_is_idempotent_and_visible_to_transformers():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert register() == register() == ATTN_NAME
    assert ALL_ATTENTION_FUNCTIONS[ATTN_NAME] is nsa_viz_attention
    assert ATTN_NAME in ALL_MASK_ATTENTION_FUNCTIONS


def test_nested_context_managers_restore_previous_patterns(tiny_llama):
    from nsa_viz.models import current_patterns

    outer = apply_pattern(tiny_llama, SlidingWindow(8))
    with apply_pattern(tiny_llama, {0: Dense()}):
        assert current_patterns(tiny_llama) == {0: Dense()}
    assert current_patterns(tiny_llama) == {0: SlidingWindow(8), 1: SlidingWindow(8)}
    outer.restore()
    assert current_patterns(tiny_llama) == {} and tiny_llama.config._attn_implementation == "sdpa"


NSA_KW = dict(block=16, top_n=3, window=16, cmp_block=16, cmp_stride=8, init_blocks=1, local_blocks=1)


def _nsa_oracle(q, k, v, pat, scale):
    """NSA over a whole prefix (the kernels' naive oracle), inputs in transformers' [B, H, T, D]."""
    from nsa_viz.kernels.nsa_ref import nsa_attention_reference

    tr = lambda x: x.transpose(1, 2)
    kw = {f: getattr(pat, f) for f in ("block", "top_n", "window", "cmp_block", "cmp_stride", "init_blocks",
                                       "local_blocks", "combine", "granularity", "select_outside_window")}
    return nsa_attention_reference(tr(q), tr(k), tr(v), **kw, scale=scale)


def _decode_paths():
    """Inference (no grad) runs the NSA decode kernels' cache when they are installed; with gradients
    enabled the layer re-runs nsa_attention on the new queries (and their block's earlier ones)."""
    from nsa_viz.attention import _nsa_decode

    paths = [pytest.param(torch.enable_grad, id="rerun")]
    if _nsa_decode() is not None:
        paths.append(pytest.param(torch.no_grad, id="nsa_decode"))
    return paths


@needs_nsa
@pytest.mark.parametrize("mode", _decode_paths())
@pytest.mark.parametrize("granularity,outside", [("token", False), ("block", False), ("token", True), ("block", True)])
def test_nsa_decode_steps_equal_nsa_over_the_prefix(tiny_llama, granularity, outside, mode):
    """Prefill then decode steps of 1 and several tokens: each step's output equals the last rows of NSA
    over the whole prefix so far (per-block selection included: the block's earlier queries count)."""
    pat = NSA(**NSA_KW, granularity=granularity, select_outside_window=outside)
    mod = attention_modules(tiny_llama)[0]
    g = torch.Generator().manual_seed(11)
    t_all = 75
    q, k, v = (torch.randn(1, h, t_all, 32, generator=g) for h in (4, 2, 2))
    mod._nsa_viz_spec = pat
    try:
        with mode():
            t = 37
            out, _ = nsa_viz_attention(mod, q[:, :, :t], k[:, :, :t], v[:, :, :t], None, scaling=0.2)
            want = _nsa_oracle(q[:, :, :t], k[:, :, :t], v[:, :, :t], pat, 0.2)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
            for step in (1, 1, 3, 1, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1):
                out, _ = nsa_viz_attention(mod, q[:, :, t:t + step], k[:, :, :t + step], v[:, :, :t + step], None,
                                           scaling=0.2)
                want = _nsa_oracle(q[:, :, :t + step], k[:, :, :t + step], v[:, :, :t + step], pat, 0.2)[:, t:]
                torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
                t += step
            assert t == 71
    finally:
        del mod._nsa_viz_spec


@needs_nsa
@pytest.mark.parametrize("mode", _decode_paths())
def test_nsa_decode_state_follows_the_sequence(tiny_llama, mode):
    """A new prefill resets the state; a cache that does not continue what the layer saw is not trusted."""
    from nsa_viz.attention import STATE_ATTR

    pat = NSA(**NSA_KW, granularity="block")
    mod = attention_modules(tiny_llama)[0]
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, h, 40, 32, generator=g) for h in (4, 2, 2))
    k2 = torch.randn(1, 2, 40, 32, generator=g)
    mod._nsa_viz_spec = pat
    try:
        with mode():
            nsa_viz_attention(mod, q[:, :, :35], k[:, :, :35], v[:, :, :35], None, scaling=0.2)
            state = getattr(mod, STATE_ATTR)["all"]
            assert state.kv_len == 35
            if state.cache is None:  # re-run path: queries 16..34 (blocks 1 and 2) score the next ones' block
                assert state.block_queries.shape[1] == 19
            else:
                assert state.cache.kv_len == 35 and state.block_queries is None
            assert state.continues(k[:, :, :36].transpose(1, 2), 1)
            assert not state.continues(k2[:, :, :36].transpose(1, 2), 1)  # another sequence of the same length
            # another sequence's decode step: the stale block queries must not leak into it
            out, _ = nsa_viz_attention(mod, q[:, :, 35:36], k2[:, :, :36], v[:, :, :36], None, scaling=0.2)
            alone = _nsa_oracle(q[:, :, 35:36], k2[:, :, :36], v[:, :, :36], pat, 0.2)
            torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
            nsa_viz_attention(mod, q[:, :, :20], k[:, :, :20], v[:, :, :20], None, scaling=0.2)  # new prefill
            assert getattr(mod, STATE_ATTR)["all"].kv_len == 20
    finally:
        del mod._nsa_viz_spec
    apply_pattern(tiny_llama, pat)
    remove_pattern(tiny_llama)
    assert not hasattr(mod, STATE_ATTR)


@needs_nsa
@pytest.mark.parametrize("granularity", ["token", "block"])
def test_nsa_generate_with_cache(tiny_llama, granularity):
    """generate under NSA: with the KV cache it gives the greedy tokens of full recomputation, for both
    granularities (both are causal, so a decode step sees what the full forward sees)."""
    pat = NSA(**NSA_KW, granularity=granularity)
    x = random_ids(1, 70, seed=5)
    with torch.no_grad(), apply_pattern(tiny_llama, pat):
        logits = tiny_llama(x).logits
        cached = tiny_llama.generate(x, max_new_tokens=4, do_sample=False, use_cache=True)
        full = tiny_llama.generate(x, max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(cached, full)
    assert torch.isfinite(logits).all()
    assert cached.shape == (1, 74) and torch.equal(cached[:, :70], x)


@needs_nsa
def test_gated_nsa_needs_model_gates(tiny_llama):
    pat = NSA(**NSA_KW, combine="gated")
    with pytest.raises(ValueError, match="gates"):
        apply_pattern(tiny_llama, pat)
    assert tiny_llama.config._attn_implementation == "sdpa"
    mods = attention_modules(tiny_llama)
    for m in mods.values():
        m.nsa_gate = lambda q: torch.sigmoid(q[..., :3])
    try:
        x = random_ids(1, 50)
        from nsa_viz.capture import capture

        with torch.no_grad(), apply_pattern(tiny_llama, pat), capture(tiny_llama, layers=[0]) as rec:
            out = tiny_llama(x).logits
        assert torch.isfinite(out).all()
        assert rec.layers[0].nsa["gates"].shape == (1, 50, 4, 3)
    finally:
        for m in mods.values():
            del m.nsa_gate


def test_static_cache_is_refused_clearly(tiny_llama):
    """A preallocated cache would shift every query against its keys: a clear error, not wrong numbers."""
    x = random_ids(1, 20)
    with torch.no_grad(), apply_pattern(tiny_llama, SlidingWindow(8)):
        with pytest.raises(ValueError, match="preallocated caches"):
            tiny_llama.generate(x, max_new_tokens=2, do_sample=False, cache_implementation="static")
        out = tiny_llama.generate(x, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 22)


CAUSAL_CHECK = STATIC[:4] + ([NSA(**NSA_KW), NSA(**NSA_KW, granularity="block")] if nsa_kernels_available() else [])


@pytest.mark.parametrize("pattern", CAUSAL_CHECK, ids=lambda p: type(p).__name__)
def test_patterns_are_causal_inside_the_model(tiny_llama, pattern):
    """Changing the last tokens changes no earlier position's logits (perplexity under a pattern must not
    see the future), for NSA's per-block selection too: a block is scored by the block before it."""
    x = random_ids(1, 96, seed=21)
    y = x.clone()
    y[0, 88:] = random_ids(1, 8, seed=22)
    with torch.no_grad(), apply_pattern(tiny_llama, pattern):
        a, b = tiny_llama(x).logits, tiny_llama(y).logits
    torch.testing.assert_close(a[:, :88], b[:, :88], atol=1e-6, rtol=0)
    assert (a[:, 88:] - b[:, 88:]).abs().max() > 1e-3
