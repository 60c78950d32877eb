"""NSA decoding: each step equals the last rows of nsa_attention over the sequence so far, and the
incrementally compressed keys equal the compression of the whole sequence."""
import pytest
import torch

from nsa_viz.kernels.nsa import compress_mean, nsa_attention
from nsa_viz.kernels.nsa_decode import NSACache, nsa_decode

from .helpers import TOLERANCE, rel_err
from .test_nsa import SMALL, BlockMLP

# a prompt of 69 tokens, then steps of 1, 2, 1, 5, ...: blocks of 16 and compression stride 4 are crossed,
# and from position 48 on the queries choose among their visible blocks
STEPS = [69, 1, 2, 1, 5, 1, 1, 4, 1]


def run_steps(q, k, v, gates, kw, backend, compare_every=1):
    cache = NSACache()
    t = 0
    for i, n in enumerate(STEPS):
        t += n
        g = None if gates is None else gates[:, t - n:t]
        out, aux = nsa_decode(q[:, t - n:t], k[:, :t], v[:, :t], cache, **kw, gates=g, backend=backend,
                              return_aux=True)
        if i % compare_every and i != len(STEPS) - 1:
            continue
        g_full = None if gates is None else gates[:, :t]
        # the full forward by the reference composition (tests/kernels/test_nsa.py ties both backends to it)
        want, want_aux = nsa_attention(q[:, :t], k[:, :t], v[:, :t], **kw, gates=g_full, backend="reference",
                                       return_aux=True)
        assert torch.equal(aux["block_idx"], want_aux["block_idx"][:, :, t - n:]), (i, t)
        assert rel_err(out, want[:, t - n:]) < TOLERANCE[q.dtype], (i, t)
    return cache, t


@pytest.mark.parametrize("combine,granularity,backend,outside", [
    ("union", "token", "reference", False), ("union", "block", "reference", False), ("gated", "block", "reference", False),
    ("gated", "token", "triton", False), ("union", "block", "triton", False),
    ("union", "token", "triton", True), ("union", "block", "reference", True),
])
def test_decode_steps_equal_the_last_rows_of_nsa_attention(combine, granularity, backend, outside):
    b, hq, hkv, d, total = (2 if backend == "reference" else 1), 4, 2, 32, sum(STEPS)
    q, k, v = (torch.randn(b, total, h, d) for h in (hq, hkv, hkv))
    gates = torch.rand(b, total, hq, 3) if combine == "gated" else None
    kw = dict(SMALL, combine=combine, granularity=granularity, select_outside_window=outside)
    cache, t = run_steps(q, k, v, gates, kw, backend, compare_every=1)
    assert cache.kv_len == t
    assert torch.allclose(cache.k_cmp, compress_mean(k, 8, 4), atol=1e-6)


def test_learned_compression_is_extended_incrementally():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, sum(STEPS), h, 32) for h in (9, 3, 3))
    mlps = BlockMLP(32, 8, 4), BlockMLP(32, 8, 4)
    gates = torch.rand(1, sum(STEPS), 9, 3)
    kw = dict(SMALL, combine="gated", granularity="token", compress=mlps)
    with torch.no_grad():
        cache, _ = run_steps(q, k, v, gates, kw, "reference", compare_every=2)
        assert torch.allclose(cache.k_cmp, mlps[0](k), atol=1e-5)
        assert torch.allclose(cache.v_cmp, mlps[1](v), atol=1e-5)


def test_cache_misuse_is_refused():
    q, k, v = (torch.randn(1, 40, h, 32) for h in (2, 1, 1))
    cache = NSACache()
    nsa_decode(q[:, :30], k[:, :30], v[:, :30], cache, **SMALL)
    with pytest.raises(ValueError, match="reset"):
        nsa_decode(q[:, :2], k[:, :20], v[:, :20], cache, **SMALL)
    with pytest.raises(ValueError, match="cmp_block"):
        nsa_decode(q[:, 30:31], k[:, :31], v[:, :31], cache, **dict(SMALL, cmp_block=16))
    with pytest.raises(TypeError, match="NSACache"):
        nsa_decode(q[:, 30:31], k[:, :31], v[:, :31], {}, **SMALL)
    cache.reset()
    out = nsa_decode(q[:, 39:], k, v, cache, **SMALL)  # a fresh cache catches up with the whole KV cache
    assert torch.allclose(out, nsa_attention(q, k, v, **SMALL)[:, 39:], atol=1e-6)
