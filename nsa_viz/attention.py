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
STATE_ATTR = "_nsa_viz_nsa_state"    # on an attention module: {group: NSASequenceState} between generate calls
GATE_ATTR = "nsa_gate"               # on an attention module (optional): queries [B,T,HQ,D] -> NSA gates [B,T,HQ,3]

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


def _nsa_attention():
    """``nsa_viz.kernels.nsa.nsa_attention`` (Triton on CUDA, reference elsewhere); until that module is
    installed, its oracle ``nsa_ref.nsa_attention_reference`` (same signature and semantics)."""
    try:
        from .kernels.nsa import nsa_attention
        return nsa_attention
    except ImportError as exc:
        try:
            from .kernels.nsa_ref import nsa_attention_reference
            return nsa_attention_reference
        except ImportError:
            raise RuntimeError("the NSA pattern needs nsa_viz.kernels.nsa (the NSA kernels), which is not available "
                               f"in this installation: {exc}") from exc


def _nsa_decode():
    """``(NSACache, nsa_decode)`` from ``nsa_viz.kernels.nsa_decode``, or None when not installed."""
    try:
        from .kernels.nsa_decode import NSACache, nsa_decode
    except ImportError:
        return None
    return NSACache, nsa_decode


def nsa_kernels_available() -> bool:
    try:
        _nsa_attention()
    except RuntimeError:
        return False
    return True


def nsa_kwargs(p: NSA) -> dict:
    return dict(block=p.block, top_n=p.top_n, window=p.window, cmp_block=p.cmp_block, cmp_stride=p.cmp_stride,
                init_blocks=p.init_blocks, local_blocks=p.local_blocks, combine=p.combine, granularity=p.granularity,
                select_outside_window=p.select_outside_window)


class NSASequenceState:
    """What one layer (one GQA group, for per-group patterns) keeps between the forward calls of a
    generation under NSA, so that a decode step (new queries against the KV cache) gives exactly the
    last rows of NSA over the whole sequence.

    A call whose queries cover all keys (a prefill) starts a new sequence. A later call continues it
    only if the cache grew by exactly its new tokens and still holds the key this state saw last;
    otherwise (another sequence, a reordered or cropped cache) the state is rebuilt from the cache.
    With the NSA decode kernels installed the state holds their ``NSACache`` (compressed keys and
    values kept up to date incrementally); without them each step runs ``nsa_attention`` on the new
    queries against the whole cache. For ``granularity="block"`` the queries of the current query
    block and of the block before it are kept too, because a block's shared selection is scored by the
    queries of the block before it.
    """

    def __init__(self):
        self.kv_len = 0
        self.last_key: Optional[torch.Tensor] = None
        self.block_queries: Optional[torch.Tensor] = None  # queries at positions [previous block start, kv_len)
        self.cache = None

    def continues(self, k: torch.Tensor, q_len: int) -> bool:
        prev = k.shape[1] - q_len
        return (prev > 0 and self.kv_len == prev and self.last_key is not None
                and self.last_key.shape == k[:, prev - 1].shape and torch.equal(self.last_key, k[:, prev - 1]))

    def held_queries(self, q: torch.Tensor, pattern: NSA, kv_len: int) -> torch.Tensor:
        """The queries that score the new ones' selection: those of the previous and the current query
        block, then ``q``."""
        if pattern.granularity != "block" or self.block_queries is None or self.block_queries.shape[1] == 0:
            return q
        start = _scoring_start(kv_len - q.shape[1], pattern.block)
        held = self.block_queries[:, self.block_queries.shape[1] - (kv_len - q.shape[1] - start):]
        return torch.cat([held.to(q.dtype), q], dim=1)

    def advance(self, q: torch.Tensor, k: torch.Tensor, pattern: Optional[NSA],
                q_all: Optional[torch.Tensor] = None) -> None:
        """Remember the state after a call whose queries ``q_all`` (default ``q``) end at ``k``'s last key
        (``pattern`` None: the decode kernels' cache keeps what block granularity needs)."""
        tk = k.shape[1]
        self.kv_len = tk
        self.last_key = k[:, tk - 1].detach().clone()
        if pattern is not None and pattern.granularity == "block":
            q_all = q if q_all is None else q_all
            keep = tk - _scoring_start(tk, pattern.block)  # what the next call's first query block is scored by
            self.block_queries = q_all[:, q_all.shape[1] - min(keep, q_all.shape[1]):].detach().clone()

    def reset(self) -> None:
        """Forget the sequence (the decode cache object is kept, emptied, for reuse)."""
        cache = self.cache
        self.__init__()
        if cache is not None:
            cache.reset()
            self.cache = cache


def _scoring_start(q_start: int, block: int) -> int:
    """First position whose query matters to the selection of a query at ``q_start`` under block granularity:
    the start of the block before ``q_start``'s."""
    return max(0, (q_start // block - 1) * block)


def _run_nsa(pattern: NSA, q, k, v, scale, backend, return_info, state: Optional[NSASequenceState], gates):
    kw = dict(nsa_kwargs(pattern), gates=gates, scale=scale, backend=backend)
    tq, tk = q.shape[1], k.shape[1]
    decoder = _nsa_decode() if state is not None and not torch.is_grad_enabled() else None
    if state is not None and (tq == tk or not state.continues(k, tq)):
        # a prefill, or a cache that is not the continuation of what this layer saw: start afresh (for
        # block granularity the earlier queries are then unknown: the first new block keeps its forced blocks)
        state.reset()
    if decoder is not None:
        # the decode kernels keep the compressed keys (and a block's running importance) in NSACache;
        # a prefill is a call whose queries are the whole prompt
        NSACache, nsa_decode = decoder
        if state.cache is None:
            state.cache = NSACache(pattern.cmp_block, pattern.cmp_stride)
        res = nsa_decode(q, k, v, state.cache, **kw, return_aux=return_info)
        state.advance(q, k, None)
    elif state is None or tq == tk:
        # no decode state wanted (capture's comparisons, training with gradients) or a prefill
        res = _nsa_attention()(q, k, v, **kw, return_aux=return_info)
        if state is not None:
            state.advance(q, k, pattern)
    else:
        # without the decode kernels: NSA of the new queries, and of the earlier queries that score their
        # blocks (block granularity), against the whole cache; only the new rows are kept
        q_all = state.held_queries(q, pattern, tk)
        g_all = gates
        if gates is not None and q_all.shape[1] != tq:
            g_all = torch.cat([gates.new_zeros(gates.shape[0], q_all.shape[1] - tq, *gates.shape[2:]), gates], 1)
        res = _nsa_attention()(q_all, k, v, **dict(kw, gates=g_all), return_aux=return_info)
        state.advance(q, k, pattern, q_all)
        if q_all.shape[1] != tq:
            res = (res[0][:, -tq:], {n: _last_rows(n, t, tq) for n, t in res[1].items()}) if return_info else res[:, -tq:]
    if not return_info:
        return res
    return res[0], {"aux": res[1], "gates": gates}


def _last_rows(name: str, t: torch.Tensor, tq: int) -> torch.Tensor:
    """The rows of the last ``tq`` queries of an NSA auxiliary output (query axis 2 for per-group ones)."""
    axis = 2 if name in ("block_idx", "block_count", "importance") else 1
    return t.narrow(axis, t.shape[axis] - tq, tq)


def run_pattern(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                backend: str = "auto", return_info: bool = False, state: Optional[NSASequenceState] = None,
                gates: Optional[torch.Tensor] = None):
    """Attention of ``q [B, Tq, HQ, D]`` over ``k, v [B, Tk, HKV, D]`` under one pattern.

    Returns the output ``[B, Tq, HQ, D]``; with ``return_info`` also a dict holding what capture
    needs: ``layout`` and ``lse`` (``[B, HQ, Tq]``) for a static pattern; for NSA ``aux`` (the NSA
    kernels' auxiliary outputs: ``block_idx``, ``block_count``, ``importance``, ``lse [B, Tq, HQ]``)
    and ``gates`` (None unless gated).
    ``state`` (NSA only) carries a generation's decode state between calls; ``gates [B, Tq, HQ, 3]``
    feed ``NSA(combine="gated")``.
    """
    if isinstance(pattern, NSA):
        return _run_nsa(pattern, q, k, v, scale, backend, return_info, state, gates)
    layout = layout_for(pattern, q.shape[1], k.shape[1], q.device, head_dim=q.shape[-1])
    if not return_info:
        return block_sparse_attention(q, k, v, layout, scale, backend=backend)
    out, lse = block_sparse_attention(q, k, v, layout, scale, backend=backend, return_lse=True)
    return out, {"layout": layout, "lse": lse}


def _is_gated(pat) -> bool:
    return isinstance(pat, NSA) and pat.combine == "gated"


def run_spec(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, backend: str = "auto",
             return_info: bool = False, states: Optional[dict] = None, gate_fn=None):
    """Run a layer's spec: one pattern for every head, or ``{kv_group: pattern}`` (others Dense).

    Returns the output and, with ``return_info``, a list of ``(kv_group_slice, pattern, info)``.
    ``states``: a dict kept by the caller (on the attention module) where NSA decode states live
    between calls, one per group. ``gate_fn(q [B, Tq, HQ, D]) -> [B, Tq, HQ, 3]`` gives gated NSA its gates.
    """
    pats = [spec] if isinstance(spec, Pattern) else list(spec.values())
    gates = None
    if any(_is_gated(p) for p in pats):
        if gate_fn is None:
            raise ValueError("NSA(combine='gated') needs gates [B, T, HQ, 3] from the model (an attribute "
                             f"`{GATE_ATTR}` on the attention module mapping queries to gates); a pretrained "
                             "model has none: use combine='union'")
        gates = gate_fn(q)

    def one(pat, heads: slice, groups: slice, key):
        st = states.setdefault(key, NSASequenceState()) if isinstance(pat, NSA) and states is not None else None
        return run_pattern(pat, q[:, :, heads], k[:, :, groups], v[:, :, groups], scale, backend=backend,
                           return_info=return_info, state=st,
                           gates=gates[:, :, heads] if _is_gated(pat) else None)

    hkv = k.shape[2]
    if isinstance(spec, Pattern):
        res = one(spec, slice(None), slice(None), "all")
        return (res[0], [(slice(0, hkv), spec, res[1])]) if return_info else res
    g = q.shape[2] // hkv
    outs, infos = [], []
    for grp in range(hkv):
        pat = spec.get(grp, Dense())
        res = one(pat, slice(grp * g, (grp + 1) * g), slice(grp, grp + 1), grp)
        outs.append(res[0] if return_info else res)
        if return_info:
            infos.append((slice(grp, grp + 1), pat, res[1]))
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


def _check_positions(layer, q_len: int, kv_len: int, position_ids) -> None:
    """Patterns place query i at key position ``kv_len - q_len + i``. A preallocated cache (transformers'
    ``StaticCache``) hands over keys beyond the last query, which would shift every query: refuse it.
    Checked only when the keys outnumber the queries (a cached step), where it can happen."""
    if q_len == kv_len or not isinstance(position_ids, torch.Tensor) or position_ids.numel() == 0:
        return
    last = int(position_ids[..., -1].max())
    if last != kv_len - 1:
        raise ValueError(f"nsa_viz attention (layer {layer}) got {kv_len} cached keys but its last query is at "
                         f"position {last}: preallocated caches (cache_implementation='static' and similar) are "
                         "not supported; use the default dynamic cache")


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
    _check_positions(layer, query.shape[2], key.shape[2], kwargs.get("position_ids"))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # views, no copies
    backend = getattr(module, BACKEND_ATTR, "auto")
    want_info = recorder is not None and recorder.wants(module)
    states = getattr(module, STATE_ATTR, None)
    if states is None:
        states = {}
        setattr(module, STATE_ATTR, states)
    res = run_spec(spec, q, k, v, scaling, backend=backend, return_info=want_info, states=states,
                   gate_fn=getattr(module, GATE_ATTR, None))
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


__all__ = ["ATTN_NAME", "NSASequenceState", "layout_for", "nsa_viz_attention", "nsa_viz_mask", "register", "run_pattern", "run_spec",
           "nsa_kernels_available"]
