"""Shared comparison of a kernel backend against the reference on fresh random inputs."""
import torch

from nsa_viz.kernels import block_sparse_attention

# fp32 kernels run IEEE dots; half types round p and the products to 8/11 mantissa bits.
TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def random_qkv(b, tq, tk, hq, hkv, d, dtype, seed=None, layout_bhtd=False):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    def make(t, h):
        x = torch.randn(b, t, h, d, generator=gen).to(dtype)
        if layout_bhtd:  # transformers' [B, H, T, D], seen by the kernel as a strided view
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return x.requires_grad_(True)
    return make(tq, hq), make(tk, hkv), make(tk, hkv)


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ over finite entries; the floor keeps an all-zero reference (e.g. the gradient of a
    softmax over a single key) from turning rounding noise into a huge ratio."""
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    floor = 1e-3 * max(1, int(finite.sum())) ** 0.5
    return ((a - b)[finite].norm() / b[finite].norm().clamp_min(floor)).item()


def compare_backends(q, k, v, layout, scale=None):
    """Run triton and reference, return relative errors of out, lse, dq, dk, dv."""
    results = []
    do = torch.randn(q.shape[0], q.shape[1], q.shape[2], q.shape[3]).to(q.dtype)
    for backend in ("triton", "reference"):
        out, lse = block_sparse_attention(q, k, v, layout, scale, backend=backend, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), do)
        results.append((out, lse, *grads))
    tri, ref = results
    for t in tri:
        assert not torch.isnan(t).any(), "NaN in kernel output"
    assert torch.equal(torch.isneginf(tri[1]), torch.isneginf(ref[1])), "LSE -inf rows differ"
    return [rel_err(x, y) for x, y in zip(tri, ref)]
