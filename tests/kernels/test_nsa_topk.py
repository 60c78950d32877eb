"""Triton top-n block selection: identical indices to the composition's PyTorch ranking (the oracle)."""
import pytest
import torch

from nsa_viz.kernels import nsa_topk
from nsa_viz.kernels.nsa import select_blocks
from nsa_viz.kernels.nsa_compressed import selection_importance
from nsa_viz.kernels.nsa_topk import pick_top_blocks


@pytest.fixture(params=[True, False], ids=["whole-rows", "chunk-merge"])
def both_forms(request, monkeypatch):
    """Runs the test with each form of the single-launch top-n: rows held whole, or the chunked merge."""
    monkeypatch.setattr(nsa_topk, "TOPN_WHOLE_ROW_MAX", 1024 if request.param else 0)


def both(scores, cur, **kw):
    tri = pick_top_blocks(scores, cur, backend="triton", **kw)
    ref = pick_top_blocks(scores, cur, backend="reference", **kw)
    return tri, ref


@pytest.mark.parametrize("kind, nsel, rows, top_n, init, local", [
    ("ties", 300, 24, 16, 1, 2),     # integer scores: many ties, several chunks (chunk shrunk below)
    ("ties", 9, 23, 16, 1, 2),       # fewer visible blocks than n: -1 padding
    ("random", 200, 37, 5, 0, 0),    # nothing forced, n not a power of two
    ("zeros", 70, 20, 4, 2, 1),      # all scores equal (+0.0 and -0.0): pure index order
    ("random", 200, 37, 3, 1, 2),    # the forced blocks fill the whole top-n
    ("close", 300, 24, 16, 1, 2),    # scores within 1e-6 of each other: the search starts from a narrow range
    ("inf", 64, 20, 5, 1, 2),        # more +inf scores than top_n (they rank with the forced blocks): exactly n
])
def test_matches_reference(kind, nsel, rows, top_n, init, local, both_forms, monkeypatch):
    monkeypatch.setitem(nsa_topk.TOPN_LAUNCH, "chunk", 32)
    gen = torch.Generator().manual_seed(nsel + rows)
    shape = (2, 2, rows, nsel)
    if kind == "ties":
        scores = torch.randint(0, 3, shape, generator=gen).float()
    elif kind == "random":
        scores = torch.rand(shape, generator=gen)
    elif kind == "inf":
        scores = torch.rand(shape, generator=gen)
        scores[..., 10:20] = float("inf")
    elif kind == "close":
        scores = 1.0 + 1e-6 * torch.rand(shape, generator=gen)
    else:
        scores = torch.zeros(shape)
        scores[..., ::3] = -0.0
    cur = torch.randint(-1, nsel + 3, (rows,), generator=gen)  # includes rows that see nothing / past the end
    tri, ref = both(scores, cur, top_n=top_n, init_blocks=init, local_blocks=local)
    assert tri.dtype == torch.int32 and tri.shape == ref.shape == (2, 2, rows, top_n)
    assert torch.equal(tri, ref)


def test_whole_rows_at_their_widest():
    """Rows of exactly TOPN_WHOLE_ROW_MAX blocks (64k tokens at l' = 64) still take the whole-row kernel and
    match the oracle; its counting search packs two counts into 16-bit fields, so rows must stay below 2**16."""
    assert nsa_topk.TOPN_WHOLE_ROW_MAX < 2**16
    nsel = nsa_topk.TOPN_WHOLE_ROW_MAX
    gen = torch.Generator().manual_seed(9)
    scores = torch.randint(0, 50, (1, 1, 6, nsel), generator=gen).float()  # ties across the whole row
    cur = torch.tensor([nsel - 1, nsel + 4, 700, 15, 0, -1])
    tri, ref = both(scores, cur, top_n=16, init_blocks=1, local_blocks=2)
    assert torch.equal(tri, ref)


@pytest.mark.parametrize("nsel", [1024, 300, 64, 40])
def test_whole_rows_hold_only_the_columns_their_rows_see(nsel):
    """Ascending rows (the causal forward): programs whose rows see only the first quarter or half of the columns
    hold just those (1024 columns held as 256, 512 or 1024; 512 as 128, 256 or 512; 64 as 16, 32 or 64); a
    program mixing an early and a late row holds them all."""
    gen = torch.Generator().manual_seed(nsel)
    rows = 48
    scores = torch.randint(0, 4, (1, 2, rows, nsel), generator=gen).float()  # many ties
    cur = torch.linspace(-1, nsel + 2, rows).round().long()
    cur[20], cur[33] = 1, nsel - 1  # a program with an early and a late row; the last column's edge
    tri, ref = both(scores, cur, top_n=6, init_blocks=1, local_blocks=2)
    assert torch.equal(tri, ref)


def test_end_to_end_equals_select_blocks(both_forms):
    """select_blocks(selection_importance(...)) for token and block granularity, on a non-contiguous view."""
    gen = torch.Generator().manual_seed(3)
    b, t, hq, hkv, d, block = 1, 150, 4, 2, 32, 16
    q = torch.randn(b, t, hq, d, generator=gen)
    kc = torch.randn(b, (t - 32) // 16 + 1, hkv, d, generator=gen)
    lse = torch.logsumexp(torch.randn(b, t, hq, 8, generator=gen), -1) + 3
    imp = selection_importance(q, kc, lse, cmp_block=32, cmp_stride=16, block=block, kv_len=t, backend="reference")
    imp = imp.round(decimals=2)  # coarse scores: ties
    pos = torch.arange(t)
    want = select_blocks(imp, top_n=5, block=block, init_blocks=1, local_blocks=2, kv_len=t)
    got = pick_top_blocks(imp, pos // block, top_n=5, init_blocks=1, local_blocks=2, backend="triton")
    assert torch.equal(got, want)
    # a strided view (rows of a larger tensor) gives the same result
    wide = torch.zeros(b, hkv, t, imp.shape[-1] + 5)
    wide[..., :imp.shape[-1]] = imp
    got = pick_top_blocks(wide[..., :imp.shape[-1]], pos // block, top_n=5, init_blocks=1, local_blocks=2,
                          backend="triton")
    assert torch.equal(got, want)


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_n"):
        pick_top_blocks(torch.zeros(1, 1, 2, 4), torch.zeros(2), top_n=2, init_blocks=1, local_blocks=2)
    with pytest.raises(ValueError, match="cur_block"):
        pick_top_blocks(torch.zeros(1, 1, 2, 4), torch.zeros(3), top_n=4, init_blocks=1, local_blocks=2)


@pytest.mark.parametrize("kind", ["ties", "zeros"])
def test_column_splits_give_the_same_indices(kind, monkeypatch):
    """Decode's two-stage form (partial top-n per column run, then a merge) keeps the oracle's tie rule."""
    monkeypatch.setitem(nsa_topk.TOPN_LAUNCH, "chunk", 32)
    gen = torch.Generator().manual_seed(5)
    shape = (1, 2, 5, 200)
    scores = torch.randint(0, 3, shape, generator=gen).float() if kind == "ties" else torch.zeros(shape)
    cur = torch.tensor([199, 150, 3, -1, 64])
    kw = dict(top_n=6, init_blocks=1, local_blocks=2)
    want = pick_top_blocks(scores, cur, backend="reference", **kw)
    for splits in (2, 4):
        assert torch.equal(nsa_topk.pick_top_blocks_triton(scores, cur, splits=splits, **kw), want)
