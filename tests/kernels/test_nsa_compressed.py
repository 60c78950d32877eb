"""NSA compressed attention and selection importance: references against loops, Triton against references."""
import pytest
import torch

from nsa_viz.kernels.nsa_compressed import (compressed_attention, compressed_importance, compressed_lse,
                                            selection_importance)
from nsa_viz.kernels.nsa_compressed_ref import (compressed_attention_reference, num_compressed,
                                                selection_importance_reference)

from .helpers import TOLERANCE, rel_err


def random_cmp(b, tq, kv_len, hq, hkv, d, l, s, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nc = num_compressed(kv_len, l, s)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True)
    return make(b, tq, hq, d), make(b, nc, hkv, d), make(b, nc, hkv, d)


def loop_oracle(q, kc, vc, l, s, kv_len, block, scale):
    """Per query: visible compressed keys, their softmax, and eq. 9 by token overlap counted one token at a time."""
    b, tq, hq, d = q.shape
    nc, hkv = kc.shape[1], kc.shape[2]
    g = hq // hkv
    nsel = -(-kv_len // block)
    out = torch.zeros(b, tq, hq, d, dtype=torch.float64)
    lse = torch.full((b, tq, hq), float("-inf"), dtype=torch.float64)
    imp = torch.zeros(b, hkv, tq, nsel, dtype=torch.float64)
    for bb in range(b):
        for i in range(tq):
            p = kv_len - tq + i
            keys = [j for j in range(nc) if j * s + l - 1 <= p]
            for h in range(hq):
                if not keys:
                    continue
                sc = (kc[bb, keys, h // g].double() @ q[bb, i, h].double()) * scale
                lse[bb, i, h] = torch.logsumexp(sc, 0)
                prob = torch.softmax(sc, 0)
                out[bb, i, h] = prob @ vc[bb, keys, h // g].double()
                for pj, j in zip(prob.tolist(), keys):
                    for t in range(j * s, j * s + l):
                        imp[bb, h // g, i, t // block] += pj / s
    return out, lse, imp


@pytest.mark.parametrize("l, s, block, kv_len, tq", [(32, 16, 64, 150, 150), (16, 16, 16, 70, 70), (16, 8, 32, 90, 5)])
def test_reference_matches_loop(l, s, block, kv_len, tq):
    q, kc, vc = random_cmp(2, tq, kv_len, 6, 2, 32, l, s, torch.float32, seed=1)
    kv = None if tq == kv_len else kv_len
    out, lse = compressed_attention_reference(q, kc, vc, cmp_block=l, cmp_stride=s, kv_len=kv, max_bytes=20000)
    imp = selection_importance_reference(q, kc, lse, cmp_block=l, cmp_stride=s, block=block, kv_len=kv_len, max_bytes=20000)
    o2, l2, i2 = loop_oracle(q, kc, vc, l, s, kv_len, block, 32 ** -0.5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(l2))
    assert rel_err(out, o2) < 1e-5 and rel_err(lse, l2) < 1e-5 and rel_err(imp, i2) < 1e-5


def compare(q, kc, vc, l, s, kv_len, block):
    """Relative errors of the Triton kernels against the references (importance from the same LSE)."""
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
    kv = None if kv_len == q.shape[1] else kv_len
    res = []
    for backend in ("triton", "reference"):
        out, lse = compressed_attention(q, kc, vc, cmp_block=l, cmp_stride=s, kv_len=kv, backend=backend)
        res.append((out, lse, *torch.autograd.grad(out, (q, kc, vc), do)))
    tri, ref = res
    assert not any(torch.isnan(t).any() for t in tri), "NaN in kernel results"
    assert torch.equal(torch.isneginf(tri[1]), torch.isneginf(ref[1])), "rows with nothing visible differ"
    errs = dict(zip(("out", "lse", "dq", "dk", "dv"), (rel_err(a, b) for a, b in zip(tri, ref))))
    imps = [selection_importance(q.detach(), kc.detach(), ref[1], cmp_block=l, cmp_stride=s, block=block, kv_len=kv_len,
                                 backend=backend) for backend in ("triton", "reference")]
    errs["importance"] = rel_err(*imps)
    return errs


@pytest.mark.parametrize("hq, hkv, d, dtype, l, s, block, tq, kv_len", [
    (9, 3, 64, torch.bfloat16, 32, 16, 64, 150, 150),   # SmolLM2 heads, paper geometry, prefill
    (4, 2, 32, torch.float32, 32, 16, 64, 20, 1200),    # decode rows: > 64 compressed keys, spill across key tiles
    (4, 1, 32, torch.float32, 16, 16, 16, 90, 90),      # l = d = l': the identity mapping
    (2, 1, 128, torch.float16, 16, 8, 32, 40, 300),
])
def test_triton_matches_reference(hq, hkv, d, dtype, l, s, block, tq, kv_len):
    q, kc, vc = random_cmp(1, tq, kv_len, hq, hkv, d, l, s, dtype, seed=d + tq)
    errs = compare(q, kc, vc, l, s, kv_len, block)
    assert max(errs.values()) < TOLERANCE[dtype], errs


@pytest.mark.parametrize("dtype, tq, kv_len", [(torch.float32, 3, 1200), (torch.bfloat16, 70, 700)])
def test_lse_only_and_key_splits(dtype, tq, kv_len):
    """compressed_lse: the forward's LSE bit for bit (splits=1), close with split keys; importance split over
    its columns (decode) is bit-identical to the unsplit kernel and matches the reference."""
    q, kc, vc = random_cmp(1, tq, kv_len, 4, 2, 32, 32, 16, dtype, seed=tq)
    q, kc, vc = q.detach(), kc.detach(), vc.detach()
    ck = dict(cmp_block=32, cmp_stride=16, kv_len=kv_len)
    _, lse_full = compressed_attention(q, kc, vc, backend="triton", **ck)
    lse = compressed_lse(q, kc, backend="triton", **ck)
    assert torch.equal(lse, lse_full)
    ref = compressed_lse(q, kc, backend="reference", **ck)
    assert rel_err(lse, ref) < TOLERANCE[dtype]
    lse_split = compressed_lse(q, kc, splits=3, backend="triton", **ck)
    assert torch.equal(torch.isneginf(lse_split), torch.isneginf(ref)) and rel_err(lse_split, lse) < 1e-5
    imps = [selection_importance(q, kc, lse, block=64, backend="triton", splits=n, **ck) for n in (1, 2, 5)]
    assert torch.equal(imps[0], imps[1]) and torch.equal(imps[0], imps[2])
    want = selection_importance(q, kc, lse, block=64, backend="reference", **ck)
    assert rel_err(imps[0], want) < 1e-5


@pytest.mark.parametrize("hq, hkv, d, dtype, tq, kv_len", [
    (9, 3, 64, torch.bfloat16, 150, 150),   # group of 3: padded to 4 rows per query, one masked
    (16, 1, 32, torch.float16, 40, 300),    # a whole group of 16 heads in the rows, queries at the end
    (2, 2, 32, torch.float32, 77, 77),      # group of 1: 128 queries per program, early rows see nothing
    (32, 1, 32, torch.float32, 40, 300),    # group of 32: 8 queries per program, too few rows for tl.dot
])
def test_packed_importance_finds_its_own_lse(hq, hkv, d, dtype, tq, kv_len):
    """compressed_importance (LSE found inside the packed kernel) and the packed kernel with a given LSE
    match the reference (compressed_lse + selection_importance), rows with nothing visible included."""
    q, kc, _ = random_cmp(2, tq, kv_len, hq, hkv, d, 32, 16, dtype, seed=hq * tq)
    q, kc = q.detach(), kc.detach()
    ck = dict(cmp_block=32, cmp_stride=16, block=64, kv_len=kv_len)
    want = compressed_importance(q, kc, backend="reference", **ck)
    got = compressed_importance(q, kc, backend="triton", **ck)
    lse = compressed_lse(q, kc, cmp_block=32, cmp_stride=16, kv_len=kv_len, backend="reference")
    given = selection_importance(q, kc, lse, backend="triton", **ck)
    composed = selection_importance(q, kc, lse, backend="reference", **ck)  # the one-pass reference vs the two
    assert rel_err(want, composed) < 1e-5
    assert got.shape == want.shape == (2, hkv, tq, -(-kv_len // 64))
    assert not torch.isnan(got).any() and (got[:, :, : max(0, 31 - (kv_len - tq))] == 0).all()
    assert rel_err(got, want) < TOLERANCE[dtype] and rel_err(given, want) < TOLERANCE[dtype]


def packed_importance_error(tq, kv_len, hq, hkv, l, s, block, seed):
    """Relative error of ``compressed_importance`` in Triton (the packed kernel) against the reference, fp32, d=32."""
    q, kc, _ = random_cmp(1, tq, kv_len, hq, hkv, 32, l, s, torch.float32, seed=seed)
    q, kc = q.detach(), kc.detach()
    ck = dict(cmp_block=l, cmp_stride=s, block=block, kv_len=kv_len)
    got = compressed_importance(q, kc, backend="triton", **ck)
    want = compressed_importance(q, kc, backend="reference", **ck)
    assert got.shape == want.shape
    return rel_err(got, want)


@pytest.mark.parametrize("hq, hkv", [(16, 1), (6, 2)], ids=["group-16", "group-3"])
def test_packed_importance_whole_and_masked_key_tiles(hq, hkv):
    """Both passes of the packed kernel run the key tiles that every row of a program sees whole without a mask and
    the rest masked per row. With stride d=16 a tile of 64 compressed keys spans 1024 tokens: 1100 queries from
    position 0 put the first token that sees a whole tile (position 1039) at the end of a program whose other tokens
    see 63 keys, and 60 queries at the end of 2100 keys the first that sees two (2063) among tokens that see one.
    A group of 3 has padded rows, which take no part but see every tile unmasked. Both must give the reference's
    importance."""
    assert packed_importance_error(1100, 1100, hq, hkv, 32, 16, 64, seed=hq) < 1e-5
    assert packed_importance_error(60, 2100, hq, hkv, 32, 16, 64, seed=hq + 1) < 1e-5


def test_packed_importance_with_fine_compression():
    """cmp 4/4 with blocks of 64: key tiles of 256 compressed keys, so the packed kernel takes fewer rows
    (shared memory); same result as the reference."""
    assert packed_importance_error(40, 600, 6, 2, 4, 4, 64, seed=5) < 1e-5


@pytest.mark.parametrize("l, s, block", [
    (32, 16, 64),   # the paper's: the last of each block's 4 keys spills half into the next block
    (16, 8, 16),    # the second of each block's 2 keys spills; the last block's spill crosses into the next tile
    (64, 16, 32),   # keys reach two blocks ahead: the general mapping only
    (16, 16, 64),   # no key spills
    (16, 16, 16),   # one key per block (l' = d)
])
@pytest.mark.parametrize("by_blocks", [False, True], ids=["products", "by-blocks"])
def test_packed_importance_mapping(monkeypatch, l, s, block, by_blocks):
    """The packed kernel's eq. 9 mapping (own blocks and the spill carried into the next tile), as products or by
    blocks where that applies, gives the reference's importance for keys that spill one block, two blocks or none."""
    from nsa_viz.kernels import nsa_compressed
    monkeypatch.setattr(nsa_compressed, "MAPPING_BY_BLOCKS", by_blocks)
    assert nsa_compressed._maps_by_blocks(l, s, block) == (by_blocks and l <= block + s)
    # 1300 keys: more than one tile of 64 compressed keys, so spills cross from tile to tile
    assert packed_importance_error(40, 1300, 4, 2, l, s, block, seed=l + s + block) < 1e-5


@pytest.mark.parametrize("by_blocks", [False, True], ids=["products", "by-blocks"])
def test_packed_importance_mapping_with_few_tokens_per_program(monkeypatch, by_blocks):
    """A group of 32 heads leaves 8 tokens per program (too few rows for tl.dot): both mapping forms still give the
    reference's importance."""
    from nsa_viz.kernels import nsa_compressed
    monkeypatch.setattr(nsa_compressed, "MAPPING_BY_BLOCKS", by_blocks)
    assert packed_importance_error(40, 1300, 32, 1, 32, 16, 64, seed=13) < 1e-5


def test_no_complete_block_gives_zero_and_neg_inf():
    q, kc, vc = random_cmp(1, 20, 20, 2, 1, 32, 32, 16, torch.float32)
    assert kc.shape[1] == 0
    for backend in ("reference", "triton"):
        out, lse = compressed_attention(q, kc, vc, cmp_block=32, cmp_stride=16, backend=backend)
        assert (out == 0).all() and torch.isneginf(lse).all()
        imp = selection_importance(q, kc, lse, cmp_block=32, cmp_stride=16, block=64, kv_len=20, backend=backend)
        assert imp.shape == (1, 1, 20, 1) and (imp == 0).all()


@pytest.mark.parametrize("case, match", [
    ("stride", "cmp_stride must be a positive power of two"),
    ("multiple", "multiple of cmp_stride"),
    ("kv_len", "compressed keys but kv_len"),
    ("block", r"block \(l'=8\) must be a multiple"),
    ("lse", "lse must have shape"),
])
def test_clear_errors(case, match):
    q, kc, vc = random_cmp(1, 64, 64, 2, 1, 32, 32, 16, torch.float32)
    kw = dict(cmp_block=32, cmp_stride=16)
    with pytest.raises((ValueError, TypeError), match=match):
        if case == "stride":
            compressed_attention(q, kc, vc, cmp_block=32, cmp_stride=12, backend="reference")
        elif case == "multiple":
            compressed_attention(q, kc, vc, cmp_block=16, cmp_stride=32, backend="reference")
        elif case == "kv_len":
            compressed_attention(q, kc, vc, kv_len=100, backend="reference", **kw)
        elif case == "block":
            selection_importance(q, kc, torch.zeros(1, 64, 2), block=8, kv_len=64, backend="reference", **kw)
        elif case == "lse":
            selection_importance(q, kc, torch.zeros(1, 2, 64), block=64, kv_len=64, backend="reference", **kw)


def _tf32_rounding_dot(create_dot, seen: list):
    """The interpreter's tl.dot, except that "tf32" products see their fp32 operands with 10 mantissa bits, as
    tensor cores do (the interpreter computes them in full fp32); every product's operand shapes, whether they
    are fp32, and its precision are appended to ``seen``."""
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import TensorHandle

    def to_tf32(handle):
        if handle.data.dtype != np.float32:
            return handle
        return TensorHandle((handle.data.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32), handle.dtype)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.append((a.data.shape, b.data.shape, a.data.dtype == np.float32, input_precision == ir.INPUT_PRECISION.IEEE))
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = to_tf32(a), to_tf32(b)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
    return dot


@pytest.mark.parametrize("by_blocks", [False, True], ids=["products", "by-blocks"])
def test_importance_mapping_keeps_fp32_accuracy_under_tf32(monkeypatch, by_blocks):
    """The packed kernel's eq. 9 mapping in its general form is an fp32 ("ieee") tl.dot of the head-summed
    probabilities [16 tokens, 64 keys] with the weights [64 keys, 16 blocks]; by blocks (the paper's l=32, d=16,
    l'=64) it takes no product at all. With the interpreter's TF32 products rounded as tensor cores round them,
    the importance still matches the fp32 reference to 1e-6, and every fp32 product asked for IEEE. (Written as a
    broadcast-multiply-sum, as until run 13, the interpreter sees no product at all, but Triton 3.6 compiles it
    to TF32 ones for the GPU: the explicit IEEE product is what keeps the general form exact there.)"""
    from triton.runtime.interpreter import InterpreterBuilder
    from nsa_viz.kernels import nsa_compressed
    monkeypatch.setattr(nsa_compressed, "MAPPING_BY_BLOCKS", by_blocks)
    seen = []
    monkeypatch.setattr(InterpreterBuilder, "create_dot", _tf32_rounding_dot(InterpreterBuilder.create_dot, seen))
    assert packed_importance_error(48, 1300, 16, 1, 32, 16, 64, seed=11) < 1e-6
    mapping = [ieee for a, b, fp32, ieee in seen if fp32 and a == (16, 64) and b == (64, 16)]
    assert (mapping and all(mapping)) if not by_blocks else not mapping
    assert all(ieee for _, _, fp32, ieee in seen if fp32)


LOWERED = [
    ("_packed_importance_kernel", dict(GROUP=16, GROUP_P=16, TOKENS=16, FIND_LSE=True, BY_BLOCKS=True)),  # default
    ("_packed_importance_kernel", dict(GROUP=16, GROUP_P=16, TOKENS=16, FIND_LSE=True)),  # mapping on tensor cores
    ("_packed_importance_kernel", dict(GROUP=32, GROUP_P=32, TOKENS=8, FIND_LSE=False)),  # products: multiply-adds
    ("_packed_importance_kernel", dict(GROUP=32, GROUP_P=32, TOKENS=8, FIND_LSE=False, BY_BLOCKS=True)),
    ("_importance_kernel", dict(GROUP=16, BLOCK_M=16)),
]


@pytest.fixture(scope="module")
def importance_ptx():
    """PTX of the importance kernels compiled for an H100 (sm_90) by the installed Triton, which needs no GPU but
    no interpreter either: a process of its own (benchmarks/inspect_kernel.py's compile_for_gpu)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    code = (f"import json, sys; sys.path.insert(0, {str(root / 'benchmarks')!r})\n"
            "from inspect_kernel import compile_for_gpu\n"
            "from nsa_viz.kernels import nsa_compressed\n"
            f"out = [compile_for_gpu(getattr(nsa_compressed, k), dict(c, HEAD_DIM=64, BLOCK_N=64, NUM_SEL=16, "
            f"CMP_BLOCK=32, CMP_STRIDE=16, SEL_BLOCK=64, PRECISION='tf32'), num_warps=4, num_stages=2).asm['ptx'] "
            f"for k, c in {LOWERED!r}]\n"
            "print(json.dumps(out))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", range(len(LOWERED)), ids=[f"{k}-{c['GROUP']}" for k, c in LOWERED])
def test_importance_kernels_round_nothing_to_tf32_on_the_gpu(importance_ptx, case):
    """Compiled for the GPU (bf16 inputs), the importance kernels hold no TF32 instruction: no product of fp32
    operands is rounded. The interpreter cannot show this, since it computes every product in fp32. With Triton 3.6
    (the GPU image's) the mapping as it was until run 13 fails this test; Triton 3.9 compiles that form to IEEE
    products, and the test above guards the explicit form instead."""
    tf32 = [line.strip() for line in importance_ptx[case].splitlines() if "tf32" in line]
    assert not tf32, tf32[:3]
