"""Patterns compile to layouts whose token masks are exactly the patterns' mask_mod."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsa_viz import NSA, BlockSparse, Custom, Dense, Dilated, GlobalLocal, SlidingWindow


def brute_force(pattern, tq, tk):
    q = torch.arange(tq)[:, None] + tk - tq
    k = torch.arange(tk)[None, :]
    return pattern.mask_mod(q, k).expand(tq, tk)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["dense", "window", "dilated", "global"]), causal=st.booleans(),
    tq=st.integers(1, 150), extra=st.integers(0, 60), window=st.integers(1, 80), sink=st.integers(0, 9),
    stride=st.integers(1, 4), bq=st.sampled_from([16, 32, 64]), bk=st.sampled_from([16, 32]),
    glob=st.lists(st.integers(0, 200), max_size=3),
)
def test_layout_token_mask_equals_mask_mod(kind, causal, tq, extra, window, sink, stride, bq, bk, glob):
    tk = tq + extra
    pattern = {
        "dense": lambda: Dense(causal=causal),
        "window": lambda: SlidingWindow(window, causal=causal),
        "dilated": lambda: Dilated(stride=stride, block=16, window=window, causal=causal),
        "global": lambda: GlobalLocal(window=window, sink=max(sink, 0 if glob else 1), global_tokens=tuple(glob), causal=causal),
    }[kind]()
    layout = pattern.compile(tq, tk, block_q=bq, block_kv=bk)
    expected = brute_force(pattern, tq, tk)
    assert torch.equal(layout.token_mask()[0, 0], expected)
    assert layout.visible_pairs == pytest.approx(expected.sum().item())
    # a tile the layout calls full really is full; empty really is empty
    cls = layout.tile_class[0, 0]
    for qb in range(layout.num_q_blocks):
        for kb in range(layout.num_kv_blocks):
            tile = expected[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
            if cls[qb, kb] == 2:
                assert tile.all() and tile.shape[1] == bk
            elif cls[qb, kb] == 0:
                assert not tile.any()


def test_density_and_flops():
    dense = Dense().compile(1024, block_q=64, block_kv=64)
    assert dense.density == pytest.approx(1.0)
    window = SlidingWindow(128).compile(1024, block_q=64, block_kv=64)
    # queries past the first 128 see 128 keys; the first 128 see i + 1
    exact = (1024 - 128) * 128 + 128 * 129 / 2
    assert window.visible_pairs == pytest.approx(exact)
    assert window.density == pytest.approx(exact / (1024 * 1025 / 2))
    assert window.flops(num_q_heads=2, head_dim=64) == pytest.approx(4 * exact * 64 * 2)
    assert window.tile_density >= window.density


def test_custom_pattern_is_exact():
    pattern = Custom(lambda q, k: ((q // 3 + k) % 4 == 0) & (k <= q), name="odd")
    layout = pattern.compile(77, block_q=16, block_kv=16)
    assert torch.equal(layout.token_mask()[0, 0], brute_force(pattern, 77, 77))


@pytest.mark.parametrize("make, match", [
    (lambda: SlidingWindow(0), "SlidingWindow.window must be an integer >= 1"),
    (lambda: SlidingWindow(-5), "SlidingWindow.window"),
    (lambda: Dilated(stride=0), "Dilated.stride must be an integer >= 1"),
    (lambda: Dilated(block=48), "Dilated.block must be a power of two"),
    (lambda: GlobalLocal(window=8, sink=0), "needs sink >= 1 or at least one position"),
    (lambda: GlobalLocal(window=8, global_tokens=(-1,)), "global_tokens"),
    (lambda: Dense().compile(64, block_q=48), "block_q must be a power of two"),
    (lambda: Dense().compile(64, 32), "must not exceed kv_len"),
    (lambda: Custom("not a function"), "Custom.mask_fn must be callable"),
    (lambda: BlockSparse(torch.ones(3, 3, dtype=torch.bool)).compile(100), "block_mask must have shape"),
    (lambda: NSA(top_n=2), "NSA.top_n"),
    (lambda: NSA(block=64, cmp_stride=128), "multiple of cmp_stride"),
    (lambda: NSA(combine="mean"), "NSA.combine must be 'union' or 'gated'"),
    (lambda: NSA(granularity="row"), "NSA.granularity"),
])
def test_invalid_parameters_name_the_parameter(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_nsa_outside_window_flag_shows_in_the_label_only_when_set():
    assert "select_outside_window" not in NSA().label
    assert NSA(select_outside_window=True).label.endswith("select_outside_window=True)")
    assert NSA(select_outside_window=True) != NSA()
    with pytest.raises(ValueError, match="select_outside_window"):
        NSA(window=64, select_outside_window=True)  # the two local blocks of 64 would be lost


def test_nsa_has_no_static_layout():
    with pytest.raises(TypeError, match="per input"):
        NSA().compile(128)


def test_compile_is_cached():
    p = SlidingWindow(64)
    assert p.compile(256) is p.compile(256)
