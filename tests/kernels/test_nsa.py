"""NSA: the reference oracle against a per-query loop and finite differences; nsa_attention (reference
and Triton backends) against the oracle: selected sets, outputs, LSE and gradients; bad parameters."""
import math

import pytest
import torch

from nsa_viz.kernels.nsa_ref import nsa_attention_reference

from .helpers import rel_err

SMALL = dict(block=16, top_n=4, window=24, cmp_block=8, cmp_stride=4, init_blocks=1, local_blocks=2)


def make_qkv(b, tq, tk, hq, hkv, d, dtype=torch.float32):
    return tuple(torch.randn(b, t, h, d).to(dtype).requires_grad_(True) for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))


# --------------------------------------------------------------------------- the oracle itself
def loop_nsa(q, k, v, *, block, top_n, window, cmp_block, cmp_stride, init_blocks, local_blocks, combine,
             granularity, gates=None):
    """One query, one GQA group at a time with Python lists: the paper's steps spelled out (float64)."""
    q, k, v = q.double(), k.double(), v.double()
    b_, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5
    l, st, lp = cmp_block, cmp_stride, block
    nc = (tk - l) // st + 1 if tk >= l else 0
    nsel = math.ceil(tk / lp)
    kc = [k[:, j * st:j * st + l].mean(1) for j in range(nc)]
    vc = [v[:, j * st:j * st + l].mean(1) for j in range(nc)]

    def soft(qv, keys, vals):
        if not keys:
            return torch.zeros_like(qv), [], -math.inf
        s = torch.stack([qv @ kk for kk in keys]) * scale
        p = torch.softmax(s, 0)
        return sum(pi * vv for pi, vv in zip(p, vals or keys)), p.tolist(), torch.logsumexp(s, 0).item()

    imp = torch.zeros(b_, hkv, tq, nsel, dtype=torch.float64)
    for bi in range(b_):
        for h in range(hkv):
            for i in range(tq):
                p_pos = tk - tq + i
                vis = [j for j in range(nc) if j * st + l - 1 <= p_pos]
                for hh in range(h * g, (h + 1) * g):
                    _, p, _ = soft(q[bi, i, hh], [kc[j][bi, h] for j in vis], None)
                    for s_ in range(nsel):  # eq. 9: compressed block (l'/d) s + m - n
                        for m in range(lp // st):
                            for n in range(l // st):
                                j = (lp // st) * s_ + m - n
                                if 0 <= j < len(vis):
                                    imp[bi, h, i, s_] += p[j]
    out = torch.zeros(b_, tq, hq, d, dtype=torch.float64)
    sel = torch.full((b_, hkv, tq, top_n), -1, dtype=torch.int32)
    for bi in range(b_):
        for h in range(hkv):
            for i in range(tq):
                p_pos = tk - tq + i
                cur = p_pos // lp
                if granularity == "block":
                    score = sum(imp[bi, h, r] for r in range(tq) if (tk - tq + r) // lp == cur)
                else:
                    score = imp[bi, h, i]
                forced = [s_ for s_ in range(cur + 1) if s_ < init_blocks or s_ > cur - local_blocks]
                rest = sorted((s_ for s_ in range(cur + 1) if s_ not in forced), key=lambda s_: (-score[s_].item(), s_))
                chosen = sorted((forced + rest)[:top_n])
                sel[bi, h, i, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                sel_keys = [t for t in range(p_pos + 1) if t // lp in chosen]
                win_keys = [t for t in range(p_pos + 1) if p_pos - t < window]
                for hh in range(h * g, (h + 1) * g):
                    qv = q[bi, i, hh]
                    if combine == "union":
                        keys = sorted(set(sel_keys) | set(win_keys))
                        out[bi, i, hh] = soft(qv, [k[bi, t, h] for t in keys], [v[bi, t, h] for t in keys])[0]
                    else:
                        vis = [j for j in range(nc) if j * st + l - 1 <= p_pos]
                        o_c = soft(qv, [kc[j][bi, h] for j in vis], [vc[j][bi, h] for j in vis])[0]
                        o_s = soft(qv, [k[bi, t, h] for t in sel_keys], [v[bi, t, h] for t in sel_keys])[0]
                        o_w = soft(qv, [k[bi, t, h] for t in win_keys], [v[bi, t, h] for t in win_keys])[0]
                        gg = gates[bi, i, hh].double()
                        out[bi, i, hh] = gg[0] * o_c + gg[1] * o_s + gg[2] * o_w
    return out, sel, imp


@pytest.mark.parametrize("combine,granularity,tq", [("union", "token", 37), ("gated", "block", 37), ("union", "block", 20)])
def test_reference_matches_per_query_loop(combine, granularity, tq):
    params = dict(block=8, top_n=3, window=5, cmp_block=8, cmp_stride=4, init_blocks=1, local_blocks=1)
    q, k, v = make_qkv(1, tq, 37, 4, 2, 32, torch.float64)
    gates = torch.rand(1, tq, 4, 3, dtype=torch.float64) if combine == "gated" else None
    out, aux = nsa_attention_reference(q, k, v, **params, combine=combine, granularity=granularity, gates=gates,
                                       return_aux=True, max_bytes=20000)
    want, sel, imp = loop_nsa(q, k, v, **params, combine=combine, granularity=granularity, gates=gates)
    assert torch.equal(aux["block_idx"], sel)
    assert torch.allclose(aux["importance"].double(), imp, atol=1e-6)
    assert torch.allclose(out, want, atol=1e-10)


class BlockMLP(torch.nn.Module):
    """A learnable compression for tests: an MLP over each block of cmp_block tokens plus an intra-block position."""

    def __init__(self, d, cmp_block, cmp_stride, dtype=torch.float32):
        super().__init__()
        self.l, self.st = cmp_block, cmp_stride
        self.pos = torch.nn.Parameter(0.1 * torch.randn(cmp_block, d, dtype=dtype))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(cmp_block * d, 2 * d, dtype=dtype), torch.nn.GELU(),
                                       torch.nn.Linear(2 * d, d, dtype=dtype))

    def forward(self, x):
        blocks = x.unfold(1, self.l, self.st)  # [B, NC, H, D, l]
        blocks = blocks.permute(0, 1, 2, 4, 3) + self.pos
        return self.mlp(blocks.flatten(-2))


def test_reference_gradients_match_finite_differences():
    torch.manual_seed(0)
    params = dict(block=8, top_n=2, window=4, cmp_block=8, cmp_stride=4, init_blocks=1, local_blocks=1)
    q, k, v = make_qkv(1, 19, 19, 2, 1, 32, torch.float64)
    gates = torch.rand(1, 19, 2, 3, dtype=torch.float64, requires_grad=True)
    mlp_k, mlp_v = BlockMLP(32, 8, 4, torch.float64), BlockMLP(32, 8, 4, torch.float64)
    for p in list(mlp_k.parameters()) + list(mlp_v.parameters()):
        p.requires_grad_(False)
    w = mlp_k.mlp[2].weight.requires_grad_(True)
    # the selection is piecewise constant in the inputs; tiny steps stay inside one piece
    fn = lambda q, k, v, gates, w: nsa_attention_reference(q, k, v, **params, combine="gated", gates=gates,
                                                           compress=(mlp_k, mlp_v), max_bytes=4000)
    assert torch.autograd.gradcheck(fn, (q, k, v, gates, w), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    fn = lambda q, k, v: nsa_attention_reference(q, k, v, **params, combine="union", granularity="block")
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_no_visible_key_gives_zero_not_nan():
    # window 0 and a gated compressed branch before the first complete compressed block: 0 and LSE -inf
    q, k, v = make_qkv(1, 5, 5, 2, 1, 32)
    gates = torch.ones(1, 5, 2, 3, requires_grad=True)
    out, aux = nsa_attention_reference(q, k, v, **dict(SMALL, window=0), combine="gated", gates=gates, return_aux=True)
    assert torch.isneginf(aux["lse_cmp"]).all() and torch.isneginf(aux["lse_win"]).all()
    assert (aux["o_cmp"] == 0).all() and (aux["o_win"] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, gates))


BAD_PARAMS = [
    (dict(top_n=2, init_blocks=1, local_blocks=2), "top_n"),
    (dict(block=24), "block"),
    (dict(block=8, cmp_stride=16, cmp_block=16), "multiple of cmp_stride"),
    (dict(cmp_block=4, cmp_stride=8), "cmp_block"),
    (dict(cmp_stride=3), "cmp_stride"),
    (dict(window=-1), "window"),
    (dict(top_n=0), "top_n"),
    (dict(init_blocks=True), "init_blocks"),
    (dict(combine="sum"), "combine"),
    (dict(granularity="row"), "granularity"),
    (dict(backend="cuda"), "backend"),
    (dict(combine="gated"), "gates"),
    (dict(gates=torch.ones(1, 20, 2, 3)), "gates"),
    (dict(combine="gated", gates=torch.ones(1, 20, 2, 2)), "gates"),
    (dict(compress=lambda x: x), "compress"),
    (dict(compress=(lambda x: x,)), "compress"),
]


@pytest.mark.parametrize("bad,word", BAD_PARAMS)
def test_bad_parameters_are_refused_clearly(bad, word):
    q, k, v = make_qkv(1, 20, 20, 2, 1, 32)
    with pytest.raises((ValueError, TypeError), match=word):
        nsa_attention_reference(q, k, v, **{**SMALL, **bad})
