"""Triton block-sparse attention (interpreter on CPU) against the PyTorch reference."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsa_viz import BlockSparse, Custom, Dense, Dilated, GlobalLocal, SlidingWindow
from nsa_viz.kernels import block_sparse_attention, layout_from_rule, TokenRule

from .helpers import TOLERANCE, compare_backends, random_qkv

PATTERNS = {
    "dense": Dense(),
    "dense_bidirectional": Dense(causal=False),
    "window": SlidingWindow(40),
    "window_bidirectional": SlidingWindow(33, causal=False),
    "dilated": Dilated(stride=3, block=16, window=24),
    "global_local": GlobalLocal(window=24, sink=3, global_tokens=(50, 51)),
    "custom": Custom(lambda q, k: ((q - k) % 5 == 0) & (k <= q), name="every5th"),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_pattern_matches_reference(name, dtype):
    q, k, v = random_qkv(1, 90, 90, 4, 2, 32, dtype)
    layout = PATTERNS[name].compile(90, block_q=32, block_kv=16)
    errs = compare_backends(q, k, v, layout)
    assert max(errs) < TOLERANCE[dtype], dict(zip(["out", "lse", "dq", "dk", "dv"], errs))


def test_backward_sub_tiles(monkeypatch):
    # the backward kernels walk layout tiles in smaller sub-tiles; 16 inside 32x32 tiles exercises it
    from nsa_viz.kernels import block_sparse
    monkeypatch.setattr(block_sparse, "SUB_TILES", {"dkdv": 16, "dq": 16})
    q, k, v = random_qkv(1, 90, 90, 4, 2, 32, torch.float32)
    layout = GlobalLocal(window=40, sink=3).compile(90, block_q=32, block_kv=32)
    assert max(compare_backends(q, k, v, layout)) < TOLERANCE[torch.float32]


def test_hot_key_blocks_are_split_over_programs(monkeypatch):
    # a sink seen by every query: with a split size of 2 query blocks its dK/dV is summed from several programs
    from nsa_viz.kernels import block_sparse
    monkeypatch.setattr(block_sparse, "DKDV_SPLIT", 2)
    layout = GlobalLocal(window=20, sink=16).compile(100, block_q=16, block_kv=16)
    assert block_sparse._dkdv_work_items(layout) is not None
    q, k, v = random_qkv(1, 100, 100, 4, 2, 32, torch.float32)
    assert max(compare_backends(q, k, v, layout)) < TOLERANCE[torch.float32]


def test_gqa_9_3_head_dim_64_fp16_transformers_layout():
    # SmolLM2's shape: 9 query heads share 3 key/value heads; inputs as [B, H, T, D] views
    q, k, v = random_qkv(2, 70, 70, 9, 3, 64, torch.float16, layout_bhtd=True)
    layout = SlidingWindow(30).compile(70, block_q=16, block_kv=16)
    errs = compare_backends(q, k, v, layout, scale=0.11)
    assert max(errs) < TOLERANCE[torch.float16], errs


@pytest.mark.parametrize("d", [32, 128, 256])
def test_other_head_dims(d):
    q, k, v = random_qkv(1, 40, 40, 2, 1, d, torch.float16)
    layout = SlidingWindow(24).compile(40, block_q=16, block_kv=16)
    assert max(compare_backends(q, k, v, layout)) < TOLERANCE[torch.float16]


def test_decode_rows_match_last_rows_of_prefill():
    q, k, v = random_qkv(1, 75, 75, 4, 1, 32, torch.float32)
    pattern = GlobalLocal(window=20, sink=2)
    full = block_sparse_attention(q, k, v, pattern.compile(75, block_q=16, block_kv=16), backend="triton")
    last = block_sparse_attention(q[:, -3:], k, v, pattern.compile(3, 75, block_q=16, block_kv=16), backend="triton")
    torch.testing.assert_close(last, full[:, -3:], atol=1e-5, rtol=1e-5)


def test_dense_equals_sdpa():
    q, k, v = random_qkv(2, 64, 64, 6, 2, 64, torch.float32)
    for causal in (True, False):
        layout = Dense(causal=causal).compile(64, block_q=16, block_kv=32)
        out = block_sparse_attention(q, k, v, layout, backend="triton")
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_query_with_no_visible_key_gives_zero_and_finite_gradients(backend):
    blind = lambda q, k: (k <= q) & (q % 7 != 3)  # rows 3, 10, 17, ... see nothing
    layout = Custom(blind, name="blind_rows").compile(40, block_q=16, block_kv=16)
    q, k, v = random_qkv(1, 40, 40, 2, 1, 32, torch.float32)
    out, lse = block_sparse_attention(q, k, v, layout, backend=backend, return_lse=True)
    rows = torch.arange(40) % 7 == 3
    assert torch.all(out[:, rows] == 0)
    assert torch.all(torch.isneginf(lse[:, :, rows]))
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][:, rows] == 0)


def test_block_sparse_mask_and_per_head_layout():
    # a layout per sequence and kv head, as NSA's block-granular selection builds it
    b, hkv, t, blk = 2, 2, 64, 16
    n = t // blk
    base = layout_from_rule(TokenRule(causal=True), t, t, blk, blk)
    chosen = torch.rand(b, hkv, n, n) < 0.5
    chosen |= torch.eye(n, dtype=torch.bool)
    cls = torch.where(chosen, base.tile_class, torch.zeros((), dtype=torch.int8))
    from nsa_viz.kernels import BlockLayout
    layout = BlockLayout(t, t, blk, blk, cls.contiguous(), base.rule, name="per_head")
    q, k, v = random_qkv(b, t, t, 6, hkv, 32, torch.float32)
    assert max(compare_backends(q, k, v, layout)) < 2e-4
    bs = BlockSparse(torch.tril(torch.ones(n, n, dtype=torch.bool))[:, :] & (torch.arange(n)[None] % 2 == 0) | torch.eye(n, dtype=torch.bool),
                     block_q=blk, block_kv=blk)
    assert max(compare_backends(q, k, v, bs.compile(t))) < 2e-4


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tq=st.integers(1, 80), extra=st.integers(0, 40), group=st.sampled_from([1, 2, 3]), hkv=st.integers(1, 2),
    d=st.sampled_from([32, 64]), bq=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]),
    window=st.integers(1, 60), sink=st.integers(0, 5), stride=st.integers(1, 3), causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes_and_rules(tq, extra, group, hkv, d, bq, bk, window, sink, stride, causal, seed):
    tk = tq + extra
    rule = TokenRule(causal=causal, window=window, sink=sink, dilation_block=16 if stride > 1 else 0, dilation_stride=stride)
    layout = layout_from_rule(rule, tq, tk, bq, bk)
    torch.manual_seed(seed)
    q, k, v = random_qkv(1, tq, tk, hkv * group, hkv, d, torch.float32, seed=seed)
    errs = compare_backends(q, k, v, layout)
    assert max(errs) < TOLERANCE[torch.float32], errs


def test_torch_compile_runs_around_the_kernel():
    q, k, v = random_qkv(1, 48, 48, 2, 1, 32, torch.float32)
    layout = SlidingWindow(20).compile(48, block_q=16, block_kv=16)

    def block(q, k, v):
        return block_sparse_attention(q * 2.0, k, v, layout, backend="triton").sum()

    compiled = torch.compile(block, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v))


@pytest.mark.parametrize("heads", [2, 4])
def test_forward_packs_query_heads_of_a_group(monkeypatch, heads):
    # rows of several query heads of one GQA group in one forward program: a group of 4 takes 2 or 4 heads
    # per program, a group of 3 (not divisible) falls back to 1; per-(sequence, kv head) layouts, GQA, and a
    # global token whose rows must land on the right heads
    from nsa_viz.kernels import block_sparse
    monkeypatch.setattr(block_sparse, "FWD_HEADS_PER_PROGRAM", heads)
    for hq, hkv in ((8, 2), (6, 2)):
        q, k, v = random_qkv(2, 70, 70, hq, hkv, 32, torch.float32, seed=hq)
        layout = GlobalLocal(window=24, sink=3, global_tokens=(40,)).compile(70, block_q=16, block_kv=16)
        errs = compare_backends(q, k, v, layout)
        assert max(errs) < TOLERANCE[torch.float32], (hq, errs)
    # a layout per (sequence, kv head) and a mask_mod layout (partial tiles read from bitmaps by row in the block)
    from nsa_viz.kernels import BlockLayout, layout_from_mask_mod
    base = layout_from_rule(TokenRule(causal=True), 64, 64, 16, 16)
    chosen = (torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(3)) < 0.5) | torch.eye(4, dtype=torch.bool)
    per_head = BlockLayout(64, 64, 16, 16, torch.where(chosen, base.tile_class, torch.zeros((), dtype=torch.int8)),
                           base.rule, name="per_head")
    every_third = layout_from_mask_mod(lambda qp, kp: (kp <= qp) & ((qp - kp) % 3 != 1), 64, 64, 16, 16)
    for layout in (per_head, every_third):
        q, k, v = random_qkv(2, 64, 64, 8, 2, 32, torch.float32, seed=9)
        assert max(compare_backends(q, k, v, layout)) < TOLERANCE[torch.float32], layout.name
        monkeypatch.setattr(block_sparse, "FWD_HEADS_PER_PROGRAM", 1)
        one = block_sparse_attention(q, k, v, layout, backend="triton", return_lse=True)
        monkeypatch.setattr(block_sparse, "FWD_HEADS_PER_PROGRAM", heads)
        packed = block_sparse_attention(q, k, v, layout, backend="triton", return_lse=True)
        assert all(torch.equal(a, b) for a, b in zip(one, packed)), layout.name


@pytest.mark.parametrize("heads", [0, 3, 2.0])
def test_heads_per_program_must_be_a_power_of_two(heads):
    from nsa_viz.kernels.block_sparse import block_sparse_forward
    q, k, v = random_qkv(1, 32, 32, 4, 2, 32, torch.float32)
    layout = SlidingWindow(16).compile(32, block_q=16, block_kv=16)
    with pytest.raises(ValueError, match="heads_per_program must be a power of two"):
        block_sparse_forward(q, k, v, layout, 0.1, heads)
