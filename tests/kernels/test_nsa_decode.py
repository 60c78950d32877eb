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


@pytest.mark.parametrize("combine", ["union", "gated"])
@pytest.mark.parametrize("hq,hkv,d,tk,dtype,kw", [
    (4, 2, 32, 150, torch.float32, dict(SMALL)),
    (9, 3, 64, 300, torch.bfloat16, dict(block=32, top_n=4, window=40, cmp_block=16, cmp_stride=8, local_blocks=2)),
    (6, 2, 32, 333, torch.float32, dict(SMALL, cmp_block=4, cmp_stride=4)),  # l = d: no spill into the next tile
    (4, 1, 32, 400, torch.float16, dict(block=16, top_n=5, window=32, cmp_block=16, cmp_stride=8, local_blocks=0,
                                        select_outside_window=True)),
    (2, 2, 32, 37, torch.float32, dict(SMALL, top_n=8)),  # fewer visible blocks than top_n
    (4, 2, 32, 200, torch.float32, dict(SMALL, window=0)),  # no window parts
])
def test_one_token_path_matches_the_oracle(monkeypatch, hq, hkv, d, tk, dtype, kw, combine):
    """One query per sequence without gradient takes the three-launch one-token kernels (counted here): same
    blocks, importance, output and LSEs (and, gated, branch outputs) as the oracle."""
    from nsa_viz.kernels import nsa as nsa_module
    from nsa_viz.kernels.nsa_ref import nsa_attention_reference
    calls = []
    real = nsa_module.token_decode_triton
    monkeypatch.setattr(nsa_module, "token_decode_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v = (torch.randn(2, t, h, d).to(dtype) for t, h in ((1, hq), (tk, hkv), (tk, hkv)))
    kw = dict(kw, combine=combine, gates=torch.rand(2, 1, hq, 3) if combine == "gated" else None)
    with torch.no_grad():
        out, aux = nsa_attention(q, k, v, **kw, backend="triton", return_aux=True)
        want, want_aux = nsa_attention_reference(q, k, v, **kw, return_aux=True)
    assert calls, "the one-token path was not taken"
    assert torch.equal(aux["block_idx"], want_aux["block_idx"])
    assert torch.equal(aux["block_count"], want_aux["block_count"])
    assert rel_err(aux["importance"], want_aux["importance"]) < 1e-5
    assert out.dtype == want.dtype and rel_err(out, want) < TOLERANCE[dtype]
    assert set(aux) == set(want_aux)
    for name in [name for name in aux if name.startswith("o_")]:
        assert aux[name].shape == want_aux[name].shape and rel_err(aux[name], want_aux[name]) < TOLERANCE[dtype], name
    for name in [name for name in aux if name.startswith("lse")]:
        assert torch.equal(aux[name] == float("-inf"), want_aux[name] == float("-inf")), name
        assert rel_err(aux[name], want_aux[name]) < 1e-5, name


def test_one_token_path_breaks_ties_like_the_oracle():
    # a zero query scores every compressed key alike: the ranking is decided by ties (lower block wins) and by
    # the eq. 9 weights of the partly covered last blocks
    from nsa_viz.kernels.nsa_ref import nsa_attention_reference
    q = torch.zeros(1, 1, 4, 32)
    k, v = torch.randn(1, 200, 2, 32), torch.randn(1, 200, 2, 32)
    for kw in (dict(SMALL, top_n=6), dict(SMALL, top_n=6, local_blocks=0, select_outside_window=True)):
        with torch.no_grad():
            _, aux = nsa_attention(q, k, v, **kw, backend="triton", return_aux=True)
            _, want_aux = nsa_attention_reference(q, k, v, **kw, return_aux=True)
        assert torch.equal(aux["block_idx"], want_aux["block_idx"]), kw


@pytest.mark.parametrize("combine", ["union", "gated"])
def test_one_token_path_over_many_tiles(monkeypatch, combine):
    """34 tiles of compressed keys (the spill crosses tile boundaries; the gated merge of the compressed branch
    takes two rounds of 32 tiles), with the group's 8 heads summed one at a time."""
    from nsa_viz.kernels import nsa_decode_kernels
    from nsa_viz.kernels.nsa_ref import nsa_attention_reference
    monkeypatch.setattr(nsa_decode_kernels, "TOKEN_IMPORTANCE_ELEMENTS", 1024)
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, t, h, 32) for t, h in ((1, 8), (8500, 1), (8500, 1)))
    kw = dict(SMALL, top_n=6, combine=combine, gates=torch.rand(1, 1, 8, 3) if combine == "gated" else None)
    with torch.no_grad():
        out, aux = nsa_attention(q, k, v, **kw, backend="triton", return_aux=True)
        want, want_aux = nsa_attention_reference(q, k, v, **kw, return_aux=True)
    assert torch.equal(aux["block_idx"], want_aux["block_idx"])
    assert rel_err(aux["importance"], want_aux["importance"]) < 1e-5
    assert rel_err(out, want) < TOLERANCE[torch.float32]
    for name in [name for name in aux if name.startswith(("o_", "lse"))]:
        assert rel_err(aux[name], want_aux[name]) < TOLERANCE[torch.float32], name


def test_one_token_path_checks_the_compressed_keys():
    q = torch.randn(1, 1, 4, 32, dtype=torch.float16)
    k, v = (torch.randn(1, 100, 2, 32, dtype=torch.float16) for _ in range(2))
    wrong_dtype = lambda x: compress_mean(x.float(), 8, 4)  # float32 compressed keys for float16 queries
    with torch.no_grad(), pytest.raises(ValueError, match="dtype"):
        nsa_attention(q, k, v, **SMALL, compress=wrong_dtype, backend="triton")
