"""What every GPU benchmark here shares: environment facts, timing, result rows (schema in README)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script from a bare checkout too; last on the path, so that the root's `kernels/` folder (imported
# as nsa_viz.kernels) cannot shadow Hugging Face's `kernels` package, which transformers >= 5.25 imports
sys.path.append(str(ROOT))

# The generic parts (environment facts, warm-up + median timing, peak memory, result rows) live in the
# package so that `nsa-viz bench` and these scripts measure the same way.
from nsa_viz.tradeoffs import bench_ms, environment, peak_mb, write_rows  # noqa: E402,F401


_ABSENT = object()


@contextmanager
def temporarily(*changes):
    """Within the block, each ``(target, name, value)`` holds: a dict's item or a module's attribute (a kernel
    module's launch table, tile size or threshold); afterwards what was there is back (an absent item removed)."""
    saved = []
    for target, name, value in changes:
        is_dict = isinstance(target, dict)
        saved.append((target, name, is_dict, target.get(name, _ABSENT) if is_dict else getattr(target, name)))
        if is_dict:
            target[name] = value
        else:
            setattr(target, name, value)
    try:
        yield
    finally:
        for target, name, is_dict, old in reversed(saved):
            if not is_dict:
                setattr(target, name, old)
            elif old is _ABSENT:
                target.pop(name, None)
            else:
                target[name] = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    return ((a - b)[finite].norm() / b[finite].norm().clamp_min(1e-6)).item()


def capture_graph(step) -> "torch.cuda.CUDAGraph":
    """``step`` captured in one CUDA graph (after three warm-up calls on a side stream); replay() runs it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def gpu_slug(device) -> str:
    """'h100', 'h200', ... from the device name (the result file's suffix); 'cpu_smoke' on the CPU."""
    if device.type != "cuda":
        return "cpu_smoke"
    name = torch.cuda.get_device_name(device).lower()
    return next((w for w in name.replace("-", " ").split() if w[:1] in "abhl" and w[1:].isdigit()), "gpu")


def dense_cudnn_step(q, k, v):
    """A step of dense causal attention by cuDNN (SDPA, GQA expanded) over ``q [B, T, HQ, D]`` and ``k, v [B, T,
    HKV, D]``: the dense baseline of the NSA benchmarks."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def step():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True).transpose(1, 2)
    return step


def dense_decode_steps(q1, kc, vc) -> dict:
    """{backend name: step} of dense SDPA decoding the queries ``q1 [B, Tq, HQ, D]`` over the whole cache
    ``kc``/``vc [B, T, HKV, D]`` (GQA expanded by SDPA), one per backend: a backend may refuse the shape."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = q1.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    steps = {}
    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def step(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        steps[name] = step
    return steps
