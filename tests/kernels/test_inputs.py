"""Bad inputs get one clear error each, from the kernel and the reference alike."""
import pytest
import torch

from nsa_viz import Dense, SlidingWindow
from nsa_viz.kernels import block_sparse_attention, resolve_backend


def qkv(b=1, t=32, hq=4, hkv=2, d=32, dtype=torch.float32):
    return torch.randn(b, t, hq, d, dtype=dtype), torch.randn(b, t, hkv, d, dtype=dtype), torch.randn(b, t, hkv, d, dtype=dtype)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case, match", [
    ("heads", "multiple of the number of key/value heads"),
    ("head_dim", "head_dim must be one of"),
    ("dtype_mix", "share one dtype"),
    ("int_dtype", "dtype must be one of"),
    ("rank", "4 dimensions"),
    ("kv_shape", "same shape"),
    ("batch", "same batch size"),
    ("layout_len", "layout was built for"),
    ("scale", "scale must be a positive number"),
])
def test_clear_errors(backend, case, match):
    q, k, v = qkv()
    layout = Dense().compile(32, block_q=16, block_kv=16)
    scale = None
    if case == "heads":
        q = torch.randn(1, 32, 5, 32)
    elif case == "head_dim":
        q, k, v = qkv(d=48)
    elif case == "dtype_mix":
        k = k.half()
    elif case == "int_dtype":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
    elif case == "rank":
        q = q[0]
    elif case == "kv_shape":
        v = v[:, :16]
    elif case == "batch":
        q = torch.randn(2, 32, 4, 32)
    elif case == "layout_len":
        layout = Dense().compile(40, block_q=16, block_kv=16)
    elif case == "scale":
        scale = -1.0
    with pytest.raises((ValueError, TypeError), match=match):
        block_sparse_attention(q, k, v, layout, scale, backend=backend)


def test_layout_from_other_device_or_wrong_heads():
    q, k, v = qkv(b=2)
    from nsa_viz.kernels import BlockLayout
    base = Dense().compile(32, block_q=16, block_kv=16)
    bad = BlockLayout(32, 32, 16, 16, base.tile_class.expand(3, 1, -1, -1).contiguous(), base.rule)
    with pytest.raises(ValueError, match="batch dimension"):
        block_sparse_attention(q, k, v, bad)


def test_mismatched_devices():
    q, k, v = qkv()
    layout = Dense().compile(32, block_q=16, block_kv=16)
    with pytest.raises(ValueError, match="must be on one device"):
        block_sparse_attention(q.to("meta"), k, v, layout)
    with pytest.raises(ValueError, match="layout is on"):
        block_sparse_attention(q.to("meta"), k.to("meta"), v.to("meta"), layout, backend="reference")


def test_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
