"""The attention function that runs nsa-viz patterns inside Hugging Face models.

It is registered with transformers' ``AttentionInterface`` under the name ``"nsa_viz"`` (and a
matching mask function with ``AttentionMaskInterface``), so a model selects it through its own
switch, ``model.set_attn_implementation("nsa_viz")``: no module is monkey-patched. Which pattern a
layer runs is stored on that layer's attention module (``module._nsa_viz_spec``) by
:func:`nsa_viz.models.apply_pattern`; a layer without one runs the model's own attention
implementation unchanged, with the model's own mask.

transformers hands the function ``query [B, HQ, Tq, D]`` and ``key, value [B, HKV, Tk, D]`` (keys
are not repeated for GQA; during ``generate`` the query has the new tokens only and the keys the
whole cache). The kernels take ``[B, T, H, D]``; a transpose is a strided view, nothing is copied.
Static patterns run ``nsa_viz.kernels.block_sparse_attention`` on their compiled layout (Triton
on CUDA, the PyTorch reference elsewhere); ``NSA`` runs ``nsa_viz.kernels.nsa.nsa_attention``.
"""
from __future__ import annotations

import sys
import weakref
from collections import OrderedDict
from typing import Any, Dict, Optional

import torch

from .kernels import BACKENDS, block_sparse_attention, preferred_block_sizes
from .kernels.layout import BlockLayout, layout_from_mask_mod
from .patterns import NSA, BlockSparse, Dense, Pattern

ATTN_NAME = "nsa_viz"
SPEC_ATTR = "_nsa_viz_spec"          # on an attention module: Pattern, {kv_group: Pattern} or absent
BACKEND_ATTR = "_nsa_viz_backend"    # on an attention module: kernel backend name
RECORDER_ATTR = "_nsa_viz_recorder"  # on an attention module: the active capture Recorder, if any

# the model's own implementation ("sdpa", "eager", ...) per config object, so that unmapped layers
# and the mask keep behaving exactly as before; kept outside the config so it never gets serialised
_BASE_IMPL: Dict[int, tuple] = {}


def set_base_implementation(config, name: str) -> None:
    _BASE_IMPL[id(config)] = (weakref.ref(config), name)


def base_implementation(config) -> str:
    entry = _BASE_IMPL.get(id(config))
    if entry is not None and entry[0]() is config:
        return entry[1]
    return "sdpa"


def clear_base_implementation(config) -> None:
    entry = _BASE_IMPL.get(id(config))
    if entry is not None and entry[0]() is config:
        del _BASE_IMPL[id(config)]


# --------------------------------------------------------------------------- layouts
_LAYOUT_CACHE: "OrderedDict[tuple, BlockLayout]" = OrderedDict()
_LAYOUT_CACHE_SIZE = 128


def layout_for(pattern: Pattern, q_len: int, kv_len: int, device, block_sizes: Optional[tuple] = None,
               head_dim: int = 64) -> BlockLayout:
    """The compiled layout of a static ``pattern`` for ``q_len`` queries at the end of ``kv_len`` keys.

    Cached per (pattern, lengths, blocks, device): every layer of a forward pass shares one layout,
    and a decode step compiles one small layout (one query row) for all layers.
    """
    bq, bk = block_sizes or preferred_block_sizes(head_dim, device)
    device = torch.device(device)
    # BlockSparse and Custom are compared by identity (eq=False), the others by value
    key = (pattern, q_len, kv_len, bq, bk, str(device))
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None:
        _LAYOUT_CACHE.move_to_end(key)
        return hit
    if isinstance(pattern, BlockSparse):
        nqb, nkb = -(-q_len // pattern.block_q), -(-kv_len // pattern.block_kv)
        if tuple(pattern.block_mask.shape) == (nqb, nkb):
            layout = pattern.compile(q_len, kv_len, device=device)
        else:
            # another length (e.g. decode steps): evaluate the mask at absolute positions instead
            layout = layout_from_mask_mod(pattern.mask_mod, q_len, kv_len, pattern.block_q, pattern.block_kv,
                                          device=device, name="BlockSparse")
    else:
        layout = pattern.compile(q_len, kv_len, block_q=bq, block_kv=bk, device=device)
    _LAYOUT_CACHE[key] = layout
    if len(_LAYOUT_CACHE) > _LAYOUT_CACHE_SIZE:
        _LAYOUT_CACHE.popitem(last=False)
    return layout


def nsa_kernels_available() -> bool:
    try:
        from .kernels import nsa  # noqa: F401
    except ImportError:
        return False
    return True


def _nsa_attention():
    try:
        from .kernels.nsa import nsa_attention
    except ImportError as exc:  # pragma: no cover - depends on the NSA kernels being installed
        raise RuntimeError("the NSA pattern needs nsa_viz.kernels.nsa (the NSA kernels), which is not available "
                           f"in this installation: {exc}") from exc
    return nsa_attention


def nsa_kwargs(p: NSA) -> dict:
    return dict(block=p.block, top_n=p.top_n, window=p.window, cmp_block=p.cmp_block, cmp_stride=p.cmp_stride,
                init_blocks=p.init_blocks, local_blocks=p.local_blocks, combine=p.combine, granularity=p.granularity)


def run_pattern(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                backend: str = "auto", return_info: bool = False):
    """Attention of ``q [B, Tq, HQ, D]`` over ``k, v [B, Tk, HKV, D]`` under one pattern.

    Returns the output ``[B, Tq, HQ, D]``; with ``return_info`` also a dict holding what capture
    needs: ``layout`` and ``lse`` for a static pattern, ``aux`` (and ``lse`` when the NSA kernels give
    it) for NSA.
    """
    if isinstance(pattern, NSA):
        fn = _nsa_attention()
        res = fn(q, k, v, **nsa_kwargs(pattern), gates=None, scale=scale, backend=backend, return_aux=return_info)
        if not return_info:
            return res
        out, aux = res
        return out, {"aux": aux}
    layout = layout_for(pattern, q.shape[1], k.shape[1], q.device, head_dim=q.shape[-1])
    if not return_info:
        return block_sparse_attention(q, k, v, layout, scale, backend=backend)
    out, lse = block_sparse_attention(q, k, v, layout, scale, backend=backend, return_lse=True)
    return out, {"layout": layout, "lse": lse}


def run_spec(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, backend: str = "auto",
             return_info: bool = False):
    """Run a layer's spec: one pattern for every head, or ``{kv_group: pattern}`` (others Dense).

    Returns the output and, with ``return_info``, a list of ``(kv_group_slice, pattern, info)``.
    """
    if isinstance(spec, Pattern):
        res = run_pattern(spec, q, k, v, scale, backend=backend, return_info=return_info)
        if not return_info:
            return res
        return res[0], [(slice(0, k.shape[2]), spec, res[1])]
    hkv = k.shape[2]
    g = q.shape[2] // hkv
    outs, infos = [], []
    for grp in range(hkv):
        pat = spec.get(grp, Dense())
        qs, ks, vs = q[:, :, grp * g:(grp + 1) * g], k[:, :, grp:grp + 1], v[:, :, grp:grp + 1]
        res = run_pattern(pat, qs, ks, vs, scale, backend=backend, return_info=return_info)
        if return_info:
            outs.append(res[0])
            infos.append((slice(grp, grp + 1), pat, res[1]))
        else:
            outs.append(res)
    out = torch.cat(outs, dim=2)
    return (out, infos) if return_info else out


# --------------------------------------------------------------------------- masks
def _mask_is_padded(attention_mask) -> Optional[bool]:
    """Whether the model's mask hides keys for padding: False for None, the flag our mask function
    left on the tensor, None when unknown (a 4-D mask the caller built)."""
    if attention_mask is None:
        return False
    return getattr(attention_mask, "_nsa_viz_padded", None)


def nsa_viz_mask(*args, **kwargs):
    """Mask function registered for ``"nsa_viz"``: builds exactly the mask the model's own
    implementation would (so layers left to it behave as before) and marks whether it hides padding."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    base = base_implementation(kwargs.get("config"))
    fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base, sdpa_mask)
    if fn is nsa_viz_mask:
        fn = sdpa_mask
    mask = fn(*args, **kwargs)
    pad = kwargs.get("attention_mask")
    padded = bool(pad is not None and not bool(pad.all()))
    if mask is not None:
        try:
            mask._nsa_viz_padded = padded
        except (AttributeError, TypeError):  # a BlockMask or similar: unknown, refused where it matters
            pass
    return mask


def _base_attention_fn(module, base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base != "eager" and base in ALL_ATTENTION_FUNCTIONS and ALL_ATTENTION_FUNCTIONS[base] is not nsa_viz_attention:
        return ALL_ATTENTION_FUNCTIONS[base]
    # "eager" lives in the model's own modeling file
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"cannot find the eager attention of {type(module).__name__} to run an unmapped layer")
    return fn


# --------------------------------------------------------------------------- the attention function
def nsa_viz_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                      **kwargs: Any):
    """transformers attention function: ``query [B, HQ, Tq, D]``, ``key/value [B, HKV, Tk, D]``.

    Returns ``(output [B, Tq, HQ, D], None)``: attention weights are never materialised (use
    :func:`nsa_viz.capture.capture` to see where attention went).
    """
    spec = getattr(module, SPEC_ATTR, None)
    recorder = getattr(module, RECORDER_ATTR, None)
    if spec is None:
        fn = _base_attention_fn(module, base_implementation(module.config))
        result = fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if recorder is not None and recorder.wants(module):
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            recorder.record(module, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale, None, None)
        return result
    layer = getattr(module, "layer_idx", "?")
    if dropout and module.training:
        raise ValueError(f"nsa_viz attention (layer {layer}) does not implement attention dropout; "
                         "set config.attention_dropout=0 or call model.eval()")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"nsa_viz attention (layer {layer}) does not support logit soft-capping or attention sinks")
    padded = _mask_is_padded(attention_mask)
    if padded is None:
        raise ValueError(f"nsa_viz attention (layer {layer}) got a custom 4-D attention_mask it cannot honour; "
                         "pass a 2-D padding mask or none")
    if padded:
        raise ValueError(f"nsa_viz attention (layer {layer}) does not support padded batches: run sequences one at "
                         "a time or batch sequences of equal length (attention_mask all ones)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # views, no copies
    backend = getattr(module, BACKEND_ATTR, "auto")
    want_info = recorder is not None and recorder.wants(module)
    res = run_spec(spec, q, k, v, scaling, backend=backend, return_info=want_info)
    if want_info:
        out, infos = res
        recorder.record(module, q, k, v, scaling, spec, infos)
    else:
        out = res
    return out, None


_REGISTERED = False


def register() -> str:
    """Register ``"nsa_viz"`` with transformers' attention and mask interfaces (idempotent); returns the name."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(ATTN_NAME, nsa_viz_attention)
        AttentionMaskInterface.register(ATTN_NAME, nsa_viz_mask)
        _REGISTERED = True
    return ATTN_NAME


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


__all__ = ["ATTN_NAME", "layout_for", "nsa_viz_attention", "nsa_viz_mask", "register", "run_pattern", "run_spec",
           "nsa_kernels_available"]
