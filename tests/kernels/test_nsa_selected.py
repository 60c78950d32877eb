"""NSA selected-block attention: the reference against a per-query loop, the Triton kernel against the reference."""
import pytest
import torch

from nsa_viz.kernels.nsa_selected import selected_attention, selected_attention_triton
from nsa_viz.kernels.nsa_selected_ref import selected_attention_reference

from .helpers import TOLERANCE, random_qkv, rel_err


def random_block_idx(b, hkv, tq, tk, n, block, seed=0, pad=True):
    """Distinct blocks per (sequence, head, query) in random order, some slots -1; blocks may lie in the future."""
    gen = torch.Generator().manual_seed(seed)
    nsel = -(-tk // block)
    idx = torch.stack([torch.randperm(max(nsel, n), generator=gen)[:n] for _ in range(b * hkv * tq)])
    idx = torch.where(idx < nsel, idx, -1)
    if pad:
        idx = torch.where(torch.rand(idx.shape, generator=gen) < 0.2, -1, idx)
    return idx.view(b, hkv, tq, n).to(torch.int32)


def loop_oracle(q, k, v, block_idx, block, scale, window):
    """One query at a time, its key set spelled out as a Python set: the obvious semantics."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.zeros(b, tq, hq, d, dtype=torch.float64)
    lse = torch.full((b, tq, hq), float("-inf"), dtype=torch.float64)
    for bb in range(b):
        for i in range(tq):
            p = tk - tq + i
            for h in range(hq):
                hk = h // g
                keys = {t for s in block_idx[bb, hk, i].tolist() if s >= 0 for t in range(s * block, (s + 1) * block)}
                if window:
                    keys |= set(range(max(0, p - window + 1), p + 1))
                keys = sorted(t for t in keys if t <= p and t < tk)
                if not keys:
                    continue
                s = (k[bb, keys, hk].double() @ q[bb, i, h].double()) * scale
                lse[bb, i, h] = torch.logsumexp(s, 0)
                out[bb, i, h] = torch.softmax(s, 0) @ v[bb, keys, hk].double()
    return out, lse


@pytest.mark.parametrize("window", [0, 7])
def test_reference_matches_loop(window):
    q, k, v = random_qkv(2, 21, 37, 6, 2, 32, torch.float32, seed=1)
    idx = random_block_idx(2, 2, 21, 37, 3, 8, seed=2)
    out, lse = selected_attention_reference(q, k, v, idx, block=8, window=window, max_bytes=4000)
    o2, l2 = loop_oracle(q, k, v, idx, 8, 32 ** -0.5, window)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(l2))
    assert rel_err(out, o2) < 1e-5 and rel_err(lse, l2) < 1e-5


def test_nothing_visible_gives_zero_and_neg_inf():
    q, k, v = random_qkv(1, 8, 8, 2, 1, 32, torch.float32, seed=3)
    idx = torch.full((1, 1, 8, 2), -1, dtype=torch.int32)
    idx[0, 0, :, 0] = 1  # block 1 = tokens 4..7: in the future of queries 0..3
    for backend in ("reference", "triton"):
        out, lse = selected_attention(q, k, v, idx, block=4, backend=backend)
        assert torch.isneginf(lse[0, :4]).all() and (out[0, :4] == 0).all()
        assert torch.isfinite(lse[0, 4:]).all() and not torch.isnan(out).any()


def compare(q, k, v, idx, block, window, scale=None, ascending=False):
    """Relative errors (out, lse, dq, dk, dv) of the Triton kernel against the reference on one random dO."""
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
    res = []
    for backend in ("triton", "reference"):
        if backend == "triton":
            out, lse = selected_attention_triton(q, k, v, idx, block=block, window=window, scale=scale,
                                                 rows_from_top_n=ascending)
        else:
            out, lse = selected_attention(q, k, v, idx, block=block, window=window, scale=scale, backend=backend)
        res.append((out, lse, *torch.autograd.grad(out, (q, k, v), do)))
    tri, ref = res
    assert not any(torch.isnan(t).any() for t in tri), "NaN in kernel results"
    assert torch.equal(torch.isneginf(tri[1]), torch.isneginf(ref[1])), "rows with nothing visible differ"
    return dict(zip(("out", "lse", "dq", "dk", "dv"), (rel_err(a, b) for a, b in zip(tri, ref))))


@pytest.mark.parametrize("hq, hkv, d, dtype, window", [
    (9, 3, 64, torch.bfloat16, 20), (9, 3, 64, torch.float32, 0), (4, 2, 32, torch.float32, 20), (4, 2, 32, torch.bfloat16, 0),
    (32, 1, 32, torch.float32, 20)])  # a group of 32: 32-row tiles, the one-token forward
def test_triton_matches_reference(hq, hkv, d, dtype, window):
    # 50 tokens: not a multiple of the 16-token blocks; blocks in the future, padded slots, window overlap
    q, k, v = random_qkv(1, 50, 50, hq, hkv, d, dtype, seed=hq + window)
    idx = random_block_idx(1, hkv, 50, 50, 3, 16, seed=d)
    errs = compare(q, k, v, idx, 16, window)
    assert max(errs.values()) < TOLERANCE[dtype], errs


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_odd_unused_entries_select_nothing(dtype):
    # any negative entry is unused and any block past the keys selects nothing, however large: -2**31 * 16 wraps to
    # 0 in int32 arithmetic and must not turn into block 0 (forward, dQ and dK/dV alike)
    q, k, v = random_qkv(1, 40, 40, 4, 2, 32, torch.float32, seed=21)
    idx = random_block_idx(1, 2, 40, 40, 3, 16, seed=22, pad=False).to(dtype)
    odd = [-2, -2**31, 3 + 5, 2**28] + ([2**32 + 1, -2**40] if dtype == torch.int64 else [])
    plain, strange = idx.clone(), idx.clone()
    for slot, value in enumerate(odd):
        at = (0, slot % 2, 5 * slot + 3, slot % 3)
        plain[at], strange[at] = -1, value
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(23))
    runs = []
    for block_idx in (plain, strange):
        out, lse = selected_attention(q, k, v, block_idx, block=16, window=7, backend="triton")
        runs.append((out, lse, *torch.autograd.grad(out, (q, k, v), do)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_blocks_split_over_several_key_tiles(monkeypatch):
    # 8-key tiles in blocks of 32: four tiles per block, the window boundary cutting through one of them
    from nsa_viz.kernels import nsa_selected
    monkeypatch.setitem(nsa_selected.TILE_OVERRIDES, "fwd", 8)
    monkeypatch.setitem(nsa_selected.TILE_OVERRIDES, "dq", 8)
    monkeypatch.setitem(nsa_selected.TILE_OVERRIDES, "dkdv", 8)
    q, k, v = random_qkv(1, 70, 90, 4, 2, 32, torch.float32, seed=31)
    idx = random_block_idx(1, 2, 70, 90, 2, 32, seed=32)
    errs = compare(q, k, v, idx, 32, 40)
    assert max(errs.values()) < TOLERANCE[torch.float32], errs


def test_triton_decode_rows_batch_and_strided_inputs():
    # 5 queries at the end of 150 keys (decode), batch 2, [B, H, T, D] views, 32-token blocks, d=128
    q, k, v = random_qkv(2, 5, 150, 4, 1, 128, torch.float32, seed=5, layout_bhtd=True)
    idx = random_block_idx(2, 1, 5, 150, 3, 32, seed=6, pad=False).to(torch.int64)
    errs = compare(q, k, v, idx, 32, 64, scale=0.07)
    assert max(errs.values()) < TOLERANCE[torch.float32], errs


def test_triton_hot_block_split_over_items(monkeypatch):
    # every token chooses block 0: with one tile per work item its dK/dV comes from many programs
    from nsa_viz.kernels import nsa_selected
    monkeypatch.setattr(nsa_selected, "DKDV_TILES_PER_ITEM", 1)
    q, k, v = random_qkv(1, 80, 80, 2, 2, 32, torch.float32, seed=8)
    idx = random_block_idx(1, 2, 80, 80, 2, 16, seed=9)
    idx[..., 0] = 0
    idx[..., 1] = torch.where(idx[..., 1] == 0, -1, idx[..., 1])
    errs = compare(q, k, v, idx, 16, 0)
    assert max(errs.values()) < TOLERANCE[torch.float32], errs


@pytest.mark.parametrize("case, match", [
    ("idx_dtype", "int32 or int64"),
    ("idx_shape", r"shape \[B, HKV, Tq, N\]"),
    ("idx_value", "entries must be -1"),
    ("block", "power of two"),
    ("window", "window must be"),
])
def test_clear_errors(case, match):
    q, k, v = random_qkv(1, 16, 16, 2, 1, 32, torch.float32)
    idx = torch.zeros(1, 1, 16, 2, dtype=torch.int64)
    kw = dict(block=8, window=0)
    if case == "idx_dtype":
        idx = idx.float()
    elif case == "idx_shape":
        idx = idx[:, :, :5]
    elif case == "idx_value":
        idx[0, 0, 0, 0] = 2
    elif case == "block":
        kw["block"] = 12
    elif case == "window":
        kw["window"] = -1
    with pytest.raises((ValueError, TypeError), match=match):
        selected_attention(q, k, v, idx, backend="reference", **kw)


@pytest.mark.parametrize("hq, hkv, d, dtype, block, window, tq, tk", [
    (9, 3, 64, torch.bfloat16, 64, 128, 1, 700),   # SmolLM2 heads, one new token, blocks overlapping the window
    (4, 1, 32, torch.float32, 32, 0, 3, 300),      # no window, a few new tokens
    (4, 2, 32, torch.float16, 16, 40, 2, 90),      # window not a multiple of the key tile, short cache
])
def test_decode_split_matches_reference(hq, hkv, d, dtype, block, window, tq, tk):
    from nsa_viz.kernels.nsa_decode_kernels import selected_window_decode
    q, k, v = random_qkv(2, tq, tk, hq, hkv, d, dtype, seed=tk)
    idx = random_block_idx(2, hkv, tq, tk, 5, block, seed=tk)
    got = selected_window_decode(q, k, v, idx, block=block, window=window, backend="triton")
    want = selected_attention_reference(q, k, v, idx, block=block, window=window)
    assert not torch.isnan(got[0]).any()
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(want[1]))
    assert rel_err(got[0], want[0]) < TOLERANCE[dtype] and rel_err(got[1], want[1]) < TOLERANCE[dtype]


@pytest.mark.parametrize("tokens", [1, 2, 4])
@pytest.mark.parametrize("hq, hkv, d, dtype, window, tq, tk", [
    (9, 3, 64, torch.bfloat16, 20, 49, 49), (4, 2, 32, torch.float32, 0, 50, 50), (4, 1, 128, torch.float32, 64, 5, 150),
    (4, 2, 32, torch.float32, 16, 1, 70)])  # one query: a program of one real token
def test_forward_one_or_two_tokens_per_program(monkeypatch, tokens, hq, hkv, d, dtype, window, tq, tk):
    # both forward kernels for 16-row tiles: one token per program, and the batched one (one warp per token),
    # where odd token counts leave the last program half empty
    from nsa_viz.kernels import nsa_selected
    monkeypatch.setattr(nsa_selected, "FWD_TOKENS_PER_PROGRAM", tokens)
    q, k, v = random_qkv(2, tq, tk, hq, hkv, d, dtype, seed=hq + tq)
    idx = random_block_idx(2, hkv, tq, tk, 3, 16, seed=d)
    errs = compare(q, k, v, idx, 16, window)
    assert max(errs.values()) < TOLERANCE[dtype], errs
    odd = idx.clone()
    odd[0, 0, min(3, tq - 1), 0], odd[1, -1, tq - 1, 1] = -2**31, 2**28  # select nothing, as in the one-token kernel
    cleaned = torch.where((odd < 0) | (odd > 2**20), -1, odd)
    runs = [selected_attention(q, k, v, i, block=16, window=window, backend="triton") for i in (odd, cleaned)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_tokens_per_program_must_be_a_power_of_two(monkeypatch):
    from nsa_viz.kernels import nsa_selected
    monkeypatch.setattr(nsa_selected, "FWD_TOKENS_PER_PROGRAM", 3)
    q, k, v = random_qkv(1, 8, 8, 4, 2, 32, torch.float32, seed=4)
    idx = random_block_idx(1, 2, 8, 8, 2, 4, seed=4)
    with pytest.raises(ValueError, match="FWD_TOKENS_PER_PROGRAM must be a power of two"):
        selected_attention(q, k, v, idx, block=4, backend="triton")


def ascending_rows(idx):
    """``idx`` with each row sorted ascending and its -1 entries last, as the top-n writes them."""
    big = torch.iinfo(idx.dtype).max
    ordered = torch.sort(torch.where(idx < 0, big, idx), -1).values
    return torch.where(ordered == big, -1, ordered)


@pytest.mark.parametrize("tokens, tile", [(1, 8), (2, 8), (1, 4)])
@pytest.mark.parametrize("window", [0, 20])
def test_slots_that_own_nothing_are_skipped_in_any_order(monkeypatch, tokens, tile, window):
    # the kernels loop over the slots that own keys (not -1, not in the future, not in the window). Random rows
    # put such slots anywhere, and so does torch.sort (negative entries first): picked out of the row. The top-n's
    # rows (sorted, negatives last) put them first: read in order with rows_from_top_n=True. Five slots of 8-token
    # blocks, 59 queries over 60 keys: most rows hold some of each kind; 4-key tiles split each block in two.
    from nsa_viz.kernels import nsa_selected
    monkeypatch.setattr(nsa_selected, "FWD_TOKENS_PER_PROGRAM", tokens)
    monkeypatch.setitem(nsa_selected.TILE_OVERRIDES, "fwd", tile)
    monkeypatch.setitem(nsa_selected.TILE_OVERRIDES, "dq", tile)
    q, k, v = random_qkv(1, 59, 60, 4, 2, 32, torch.float32, seed=51 + window)  # odd: a half-empty last program
    shuffled = random_block_idx(1, 2, 59, 60, 5, 8, seed=52)
    negatives_first = torch.sort(shuffled, -1).values.to(torch.int64)  # torch.sort's order, int64 entries
    for idx, in_order in ((shuffled, False), (negatives_first, False), (ascending_rows(shuffled), False),
                          (ascending_rows(shuffled), True)):
        errs = compare(q, k, v, idx, 8, window, ascending=in_order)
        assert max(errs.values()) < TOLERANCE[torch.float32], (in_order, errs)
    runs = [selected_attention_triton(q, k, v, ascending_rows(shuffled), block=8, window=window,
                                      rows_from_top_n=in_order) for in_order in (False, True)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))



@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("window", [0, 9, 16])
def test_keys_past_the_sequence_are_never_read(monkeypatch, tokens, window):
    # the forward and dQ kernels address a selected tile by its first key and load it whole when the window is at
    # least a block (every owned block then ends before the query); with a shorter window the last block may run
    # past the keys, so its loads are masked. K and V here are views whose memory goes on with NaN past the last of
    # 45 keys (not a multiple of the 16-key blocks): a load past the sequence would put NaN into the results
    from nsa_viz.kernels import nsa_selected
    monkeypatch.setattr(nsa_selected, "FWD_TOKENS_PER_PROGRAM", tokens)
    q, k, v = random_qkv(1, 45, 45, 4, 2, 32, torch.float32, seed=61 + window)
    k, v = (torch.cat([x.detach(), torch.full((1, 19, 2, 32), float("nan"))], 1)[:, :45].requires_grad_(True)
            for x in (k, v))
    idx = random_block_idx(1, 2, 45, 45, 3, 16, seed=62)  # blocks 0-2 in random order: most rows hold the partial one
    errs = compare(q, k, v, idx, 16, window)  # it asserts that nothing is NaN
    assert max(errs.values()) < TOLERANCE[torch.float32], errs
