"""NSA: the reference oracle against a per-query loop and finite differences; nsa_attention (reference
and Triton backends) against the oracle: selected sets, outputs, LSE and gradients; bad parameters."""
import math

import pytest
import torch

from nsa_viz.kernels import nsa
from nsa_viz.kernels.nsa import compress_mean, nsa_attention, select_blocks
from nsa_viz.kernels.nsa_ref import _select, nsa_attention_reference

from .helpers import TOLERANCE, rel_err

# with blocks of 16 and top_n=3 (one forced initial, one local block) queries from position 48 on choose
SMALL = dict(block=16, top_n=3, window=20, cmp_block=8, cmp_stride=4, init_blocks=1, local_blocks=1)


def make_qkv(b, tq, tk, hq, hkv, d, dtype=torch.float32):
    return tuple(torch.randn(b, t, h, d).to(dtype).requires_grad_(True) for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))


# --------------------------------------------------------------------------- the oracle itself
def loop_nsa(q, k, v, *, block, top_n, window, cmp_block, cmp_stride, init_blocks, local_blocks, combine,
             granularity, gates=None, select_outside_window=False):
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
                    # causal: scored by the previous query block's queries present in q (none: forced only)
                    score = sum((imp[bi, h, r] for r in range(tq) if (tk - tq + r) // lp == cur - 1),
                                torch.zeros_like(imp[bi, h, 0]))
                else:
                    score = imp[bi, h, i]
                if select_outside_window:  # blocks starting before the window of the row's first query
                    first = p_pos if granularity == "token" else cur * lp
                    candidates = [s_ for s_ in range(cur + 1) if s_ * lp <= first - window]
                    forced = [s_ for s_ in candidates if s_ < init_blocks]
                else:
                    candidates = list(range(cur + 1))
                    forced = [s_ for s_ in candidates if s_ < init_blocks or s_ > cur - local_blocks]
                rest = sorted((s_ for s_ in candidates if s_ not in forced), key=lambda s_: (-score[s_].item(), s_))
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


@pytest.mark.parametrize("combine,granularity,tq,outside", [
    ("union", "token", 37, False), ("gated", "block", 37, False), ("union", "block", 20, False),
    ("union", "token", 37, True), ("union", "block", 37, True), ("gated", "token", 30, True)])
def test_reference_matches_per_query_loop(combine, granularity, tq, outside):
    params = dict(block=8, top_n=3, window=9 if outside else 5, cmp_block=8, cmp_stride=4, init_blocks=1,
                  local_blocks=1, select_outside_window=outside)
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
    q, k, v = make_qkv(1, 17, 17, 2, 1, 32, torch.float64)
    gates = torch.rand(1, 17, 2, 3, dtype=torch.float64, requires_grad=True)
    mlp_k, mlp_v = BlockMLP(32, 8, 4, torch.float64), BlockMLP(32, 8, 4, torch.float64)
    for p in list(mlp_k.parameters()) + list(mlp_v.parameters()):
        p.requires_grad_(False)
    w = mlp_k.mlp[2].weight.requires_grad_(True)
    # the selection is piecewise constant in the inputs; tiny steps stay inside one piece
    fn = lambda q, k, v, gates, w: nsa_attention_reference(q, k, v, **params, combine="gated", gates=gates,
                                                           compress=(mlp_k, mlp_v))
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
    (dict(top_n=3, init_blocks=2, local_blocks=2), "top_n"),
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
    (dict(select_outside_window=True, window=8), "select_outside_window"),
    (dict(select_outside_window=1), "select_outside_window"),
]


@pytest.mark.parametrize("fn", [nsa_attention_reference, nsa_attention], ids=["reference_oracle", "nsa_attention"])
@pytest.mark.parametrize("bad,word", BAD_PARAMS)
def test_bad_parameters_are_refused_clearly(fn, bad, word):
    q, k, v = make_qkv(1, 20, 20, 2, 1, 32)
    with pytest.raises((ValueError, TypeError), match=word):
        fn(q, k, v, **{**SMALL, **bad})


# --------------------------------------------------------------------------- building blocks of nsa.py
def test_compress_mean_is_the_block_mean():
    x = torch.randn(2, 77, 3, 32, requires_grad=True)
    got = compress_mean(x, 16, 4)
    want = torch.stack([x[:, j * 4:j * 4 + 16].mean(1) for j in range((77 - 16) // 4 + 1)], 1)
    assert torch.allclose(got, want, atol=1e-6)
    assert compress_mean(x[:, :15], 16, 4).shape == (2, 0, 3, 32)
    with pytest.raises(ValueError, match="cmp_block"):
        compress_mean(x, 4, 8)


def test_select_blocks_ties_forced_and_few_visible():
    # integer importance: many exact ties, which must go to the lower block index, as in the oracle
    imp = torch.randint(0, 3, (2, 3, 70, 9)).float()
    for granularity in ("token", "block"):
        got = select_blocks(imp, top_n=4, block=8, init_blocks=1, local_blocks=1, kv_len=70, granularity=granularity)
        pos = torch.arange(70)
        if granularity == "token":
            want = _select(imp, pos // 8, top_n=4, init_blocks=1, local_blocks=1)
        else:
            # block c is scored by block c - 1's queries (block 0 by none)
            per_block = torch.zeros(2, 3, 10, 9).index_add_(2, pos // 8 + 1, imp)[:, :, :9]
            want = _select(per_block, torch.arange(9), top_n=4, init_blocks=1, local_blocks=1)[:, :, pos // 8]
        assert torch.equal(got, want), granularity
    # position 20 (block 2) sees blocks 0..2 only: all taken, padded with -1; block 0 forced despite 0 importance
    imp = torch.zeros(1, 1, 1, 9)
    imp[..., 5:] = 1.0
    one = select_blocks(imp, top_n=4, block=8, init_blocks=1, local_blocks=1, q_positions=torch.tensor([20]))
    assert one.tolist() == [[[[0, 1, 2, -1]]]]
    one = select_blocks(imp, top_n=3, block=8, init_blocks=1, local_blocks=1, q_positions=torch.tensor([71]))
    assert one.tolist() == [[[[0, 5, 8]]]]  # forced first and own block, then the lowest of the tied ones
    # outside the window (16 keys, positions 56..71 at 71): candidates are blocks 0..6 (start <= 55), block 0 forced,
    # then 5 and 6 by importance; the window's blocks 7 and 8 take no slot
    one = select_blocks(imp, top_n=3, block=8, init_blocks=1, local_blocks=1, q_positions=torch.tensor([71]),
                        window=16, select_outside_window=True)
    assert one.tolist() == [[[[0, 5, 6]]]]
    # before the window has passed block 0 nothing is a candidate
    one = select_blocks(imp, top_n=3, block=8, init_blocks=1, local_blocks=1, q_positions=torch.tensor([15]),
                        window=16, select_outside_window=True)
    assert one.tolist() == [[[[-1, -1, -1]]]]


@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_select_blocks_outside_window_matches_the_oracle(granularity, backend):
    imp = torch.randint(0, 3, (2, 3, 90, 12)).float()
    kw = dict(top_n=4, init_blocks=1, local_blocks=1)
    got = select_blocks(imp, block=8, kv_len=90, granularity=granularity, window=12, select_outside_window=True,
                        backend=backend, **kw)
    pos = torch.arange(90)
    if granularity == "token":
        want = _select(imp, pos // 8, window_from=pos - 11, block=8, **kw)
    else:
        per_block = torch.zeros(2, 3, 13, 12).index_add_(2, pos // 8 + 1, imp)[:, :, :12]
        rows = torch.arange(12)
        want = _select(per_block, rows, window_from=rows * 8 - 11, block=8, **kw)[:, :, pos // 8]
    assert torch.equal(got, want)
    first = pos if granularity == "token" else pos // 8 * 8
    inside = (got >= 0) & (got * 8 > (first - 12)[None, None, :, None])
    assert not inside.any(), "a pick starts inside the window"


# --------------------------------------------------------------------------- nsa_attention against the oracle
CASES = {
    # name: (combine, granularity, backend, via_layout, B, Tq, Tk, HQ, HKV, D, dtype, extra kwargs)
    "union_token_triton_gqa9_3": ("union", "token", "triton", True, 1, 64, 64, 9, 3, 64, torch.float32, {}),
    "union_block_triton_layout": ("union", "block", "triton", True, 2, 90, 90, 4, 2, 32, torch.float32, {}),
    "union_block_triton_short_window": ("union", "block", "triton", True, 1, 64, 64, 4, 2, 32, torch.float32,
                                        dict(window=8)),
    "union_block_triton_decode_rows": ("union", "block", "triton", True, 2, 36, 100, 4, 2, 32, torch.float32, {}),
    "gated_token_triton_mlp": ("gated", "token", "triton", True, 2, 64, 64, 4, 2, 32, torch.float32, {}),
    "gated_block_triton_layout_mlp": ("gated", "block", "triton", True, 2, 75, 75, 4, 2, 64, torch.float32, {}),
    "gated_block_triton_per_token": ("gated", "block", "triton", False, 1, 21, 100, 4, 2, 32, torch.float32, {}),
    "union_token_reference": ("union", "token", "reference", True, 2, 100, 100, 9, 3, 32, torch.float32, {}),
    "gated_block_reference_mlp": ("gated", "block", "reference", False, 2, 100, 100, 4, 2, 64, torch.float32, {}),
    "union_token_triton_bf16": ("union", "token", "triton", True, 1, 64, 64, 4, 2, 64, torch.bfloat16, {}),
    "gated_block_triton_fp16": ("gated", "block", "triton", True, 1, 70, 70, 9, 3, 32, torch.float16, {}),
    "union_token_triton_outside_window": ("union", "token", "triton", True, 1, 100, 100, 9, 3, 32, torch.float32,
                                          dict(select_outside_window=True)),
    "union_block_triton_layout_outside_window": ("union", "block", "triton", True, 2, 100, 100, 4, 2, 32,
                                                 torch.float32, dict(select_outside_window=True)),
    "union_token_triton_fine_compression": ("union", "token", "triton", True, 1, 100, 100, 4, 2, 32, torch.float32,
                                            dict(cmp_block=4, cmp_stride=4, select_outside_window=True)),
    "gated_token_reference_outside_window": ("gated", "token", "reference", True, 1, 100, 100, 4, 2, 32,
                                             torch.float32, dict(select_outside_window=True)),
    "gated_block_triton_outside_window_fp16": ("gated", "block", "triton", True, 1, 100, 100, 4, 2, 32,
                                               torch.float16, dict(select_outside_window=True)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_nsa_attention_matches_reference(name, monkeypatch):
    combine, granularity, backend, via_layout, b, tq, tk, hq, hkv, d, dtype, extra = CASES[name]
    monkeypatch.setattr(nsa, "BLOCK_GRANULARITY_VIA_LAYOUT", via_layout)
    params = {**SMALL, **extra}
    q, k, v = make_qkv(b, tq, tk, hq, hkv, d, dtype)
    inputs = [q, k, v]
    kw = dict(params, combine=combine, granularity=granularity, return_aux=True)
    if combine == "gated":
        gates = torch.sigmoid(torch.randn(b, tq, hq, 3)).to(dtype).requires_grad_(True)
        inputs.append(gates)
        kw["gates"] = gates
    if dtype != torch.float32:
        # identical compressed keys for both: two roundings of a mean to 8 bits could flip a near-tie in top-n
        kw["compress"] = lambda x: compress_mean(x, params["cmp_block"], params["cmp_stride"])
    elif combine == "gated":
        mlps = BlockMLP(d, params["cmp_block"], params["cmp_stride"]), BlockMLP(d, params["cmp_block"], params["cmp_stride"])
        inputs += [p for m in mlps for p in m.parameters()]
        kw["compress"] = mlps
    do = torch.randn(b, tq, hq, d).to(dtype)
    results = []
    for fn, fkw in ((nsa_attention, dict(backend=backend)), (nsa_attention_reference, {})):
        out, aux = fn(q, k, v, **kw, **fkw)
        results.append((out, aux, torch.autograd.grad(out, inputs, do)))
    (out, aux, grads), (r_out, r_aux, r_grads) = results
    assert torch.equal(aux["block_idx"], r_aux["block_idx"]), "different blocks selected"
    chose = (aux["block_count"] == params["top_n"]) & (torch.arange(tk - tq, tk) // params["block"] >= params["top_n"])
    assert chose.float().mean() > 0.2, "too short to exercise the top-n choice"
    assert torch.equal(aux["block_count"], r_aux["block_count"])
    assert set(aux) == set(r_aux)
    tol = TOLERANCE[dtype]
    assert rel_err(aux["importance"], r_aux["importance"]) < 1e-5
    for key in [key for key in aux if key.startswith("lse")]:
        assert torch.equal(torch.isneginf(aux[key]), torch.isneginf(r_aux[key])), key
        assert rel_err(aux[key], r_aux[key]) < tol, key
    for key in ("o_cmp", "o_slc", "o_win"):
        if key in aux:
            assert rel_err(aux[key], r_aux[key]) < tol, key
    assert not torch.isnan(out).any()
    # tensors first; the compression's parameters as one vector (a key bias alone has a zero gradient:
    # softmax ignores a shift shared by all keys, so its relative error would be pure rounding noise)
    n = 4 if combine == "gated" else 3
    flat = lambda gs: [torch.cat([g.flatten() for g in gs])] if gs else []
    errs = [rel_err(out, r_out)] + [rel_err(g, rg) for g, rg in zip(grads[:n] + tuple(flat(grads[n:])),
                                                                    r_grads[:n] + tuple(flat(r_grads[n:])))]
    assert max(errs) < tol, dict(enumerate(errs))


def test_no_aux_returns_the_output_alone():
    q, k, v = make_qkv(1, 40, 40, 2, 1, 32)
    out = nsa_attention(q, k, v, **SMALL, backend="reference")
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


@pytest.mark.parametrize("combine", ["union", "gated"])
def test_few_queries_without_gradient_take_the_decode_kernels(combine):
    # Tq <= nsa.DECODE_MAX_QUERIES and no gradient: split-key selected/window kernels, same result
    q, k, v = (torch.randn(2, t, h, 32) for t, h in ((5, 9), (90, 3), (90, 3)))
    gates = torch.rand(2, 5, 9, 3) if combine == "gated" else None
    kw = dict(SMALL, combine=combine, gates=gates, return_aux=True)
    with torch.no_grad():
        out, aux = nsa_attention(q, k, v, **kw, backend="triton")
        want, want_aux = nsa_attention_reference(q, k, v, **kw)
    assert torch.equal(aux["block_idx"], want_aux["block_idx"])
    assert rel_err(out, want) < TOLERANCE[torch.float32]
    for key in [key for key in aux if key.startswith("lse")]:
        assert rel_err(aux[key], want_aux[key]) < TOLERANCE[torch.float32], key


def test_selection_layout_lists_need_no_read_from_the_device(monkeypatch):
    """The per-block path builds its layout on every call: its index lists are as wide as the key blocks, so that no
    device-to-host read finds the busiest row first (the GPU would wait for the host there). Same attention as
    with lists of the minimal width."""
    import dataclasses
    from nsa_viz.kernels import block_sparse_attention
    from .helpers import random_qkv
    q, k, v = random_qkv(1, 70, 200, 4, 2, 32, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(4)
    nkb = math.ceil(200 / 16)
    chosen = torch.stack([torch.randperm(nkb, generator=gen)[:3] for _ in range(2 * math.ceil(70 / 16))])
    chosen = chosen.view(1, 2, -1, 3).to(torch.int32)
    chosen[0, 0, 1, 2] = -1
    layout = nsa.selection_layout(chosen, 70, 200, 16, window=20)

    def no_read(self):
        raise AssertionError("a device-to-host read while building the index lists")
    monkeypatch.setattr(torch.Tensor, "item", no_read)
    assert layout.full_blocks[0].shape[-1] == layout.partial_blocks[0].shape[-1] == nkb
    assert layout.full_blocks_t[0].shape[-1] == layout.partial_blocks_t[0].shape[-1] == math.ceil(70 / 16)
    monkeypatch.undo()
    narrow = dataclasses.replace(layout, full_width_lists=False)
    assert narrow.full_blocks[0].shape[-1] < nkb
    runs = [block_sparse_attention(q, k, v, lay, backend="triton", return_lse=True) for lay in (layout, narrow)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
