"""Training native sparse attention: retrofitting a pretrained model, and training from scratch.

- **Retrofit** (:func:`retrofit_train`): a frozen pretrained model (SmolLM2 by default) gets an
  :class:`~nsa_viz.nsa_module.NSARetrofit` (learnable compression and gates in every layer) and only
  those parameters are trained, in one of two ways:

  - ``objective="transfer"`` — layer-wise *attention transfer*: one forward of the dense model, where
    each layer's NSA output is pulled toward the dense attention output (after ``o_proj``). No
    backward pass through the model, so it is the cheap first stage.
  - ``objective="kl"`` — end to end: KL divergence of the NSA model's next-token distribution from the
    dense model's (the same frozen model with the retrofit disabled), optionally plus the language-
    model loss (``lm_weight``). Slower; it corrects what layer-wise training cannot see (errors
    compounding over layers).

Text comes from :mod:`nsa_viz.data` (``code``, ``docs``, ``legal`` or the user's own files) through
:class:`TokenStream`, which draws reproducible training windows and keeps a held-out tail.

- **From scratch** (:func:`train_from_scratch`, :func:`compare_from_scratch`): a tiny Llama-style model
  trained with dense attention and with NSA on the same bytes, the same initial weights and the same
  batches, so that the two loss curves differ only by the attention.

Every loop shows a tqdm bar, writes checkpoints (only what is trained, plus the optimizer and the
history) and resumes from the last one: batches are drawn from ``(seed, step)``, so a resumed run
sees exactly the batches an uninterrupted run would have seen. The guards of
:mod:`nsa_viz.nsa_module` (selection diversity, gate saturation) are sampled every
``monitor_every`` steps into the history, and a warning is printed when they fire.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .nsa_module import NSARetrofit
from .patterns import NSA

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "nsa-viz-training/1"


# --------------------------------------------------------------------------- data
class TokenStream:
    """A long 1-D token sequence cut into a training part and a held-out tail, from which batches of
    windows are drawn reproducibly: :meth:`batch` depends only on ``(seed, step)``."""

    def __init__(self, tokens: torch.Tensor, *, val_fraction: float = 0.1):
        tokens = torch.as_tensor(tokens).flatten().long()
        if tokens.numel() < 4:
            raise ValueError(f"tokens must hold at least 4 tokens, got {tokens.numel()}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
        cut = int(tokens.numel() * (1.0 - val_fraction))
        self.train, self.val = tokens[:cut], tokens[cut:]

    @classmethod
    def from_text(cls, text: str, tokenizer=None, **kw) -> "TokenStream":
        """Tokenise ``text`` with ``tokenizer`` (a Hugging Face tokenizer) or as UTF-8 bytes when None."""
        if tokenizer is None:
            ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        else:
            from .data import encode

            ids = torch.tensor(encode(tokenizer, text, special=False), dtype=torch.long)
        return cls(ids, **kw)

    @classmethod
    def from_dataset(cls, dataset, tokenizer=None, *, max_chars: Optional[int] = None, seed: int = 0,
                     val_fraction: float = 0.1) -> "TokenStream":
        """The documents of a :class:`nsa_viz.data.Dataset` (or a built-in name: ``"code"``, ``"docs"``,
        ``"legal"``) in seeded order, joined by blank lines up to ``max_chars`` characters and tokenised.
        The held-out part is the tail, i.e. whole documents the training part does not contain (but
        the one cut in two)."""
        from .data import PACK_SEPARATOR, Dataset, load_dataset

        if isinstance(dataset, str):
            dataset = load_dataset(dataset)
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a nsa_viz.data.Dataset or a built-in name, got {type(dataset).__name__}")
        parts, total = [], 0
        for doc in dataset.sample(None, seed):
            parts.append(doc.text)
            total += len(doc.text) + len(PACK_SEPARATOR)
            if max_chars is not None and total >= max_chars:
                break
        text = PACK_SEPARATOR.join(parts)
        return cls.from_text(text if max_chars is None else text[:max_chars], tokenizer, val_fraction=val_fraction)

    @classmethod
    def combine(cls, streams: Sequence["TokenStream"]) -> "TokenStream":
        """One stream whose training part and held-out part are the concatenations of ``streams``'."""
        if not streams:
            raise ValueError("combine needs at least one TokenStream")
        out = cls.__new__(cls)
        out.train = torch.cat([s.train for s in streams])
        out.val = torch.cat([s.val for s in streams])
        return out

    def _part(self, split: str) -> torch.Tensor:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def batch(self, step: int, batch_size: int, seq_len: int, *, seed: int = 0, split: str = "train") -> torch.Tensor:
        """``[batch_size, seq_len]`` windows at random offsets drawn from ``(seed, step)``."""
        data = self._part(split)
        if seq_len < 2 or seq_len > data.numel():
            raise ValueError(f"seq_len must be in [2, {data.numel()}] for the {split} split, got {seq_len}")
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
        starts = torch.randint(0, data.numel() - seq_len + 1, (batch_size,), generator=g)
        return torch.stack([data[s:s + seq_len] for s in starts.tolist()])

    def windows(self, n: int, seq_len: int, *, split: str = "val") -> List[torch.Tensor]:
        """``n`` consecutive, non-overlapping ``[1, seq_len]`` windows from the start of a split (evaluation)."""
        data = self._part(split)
        if n * seq_len > data.numel():
            raise ValueError(f"{n} windows of {seq_len} tokens need {n * seq_len} tokens; the {split} split has "
                             f"{data.numel()}")
        return [data[i * seq_len:(i + 1) * seq_len][None] for i in range(n)]


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Union[str, Path], *, module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    step: int = 0, history: Optional[List[dict]] = None, config: Optional[dict] = None) -> Path:
    """Write ``module``'s parameters (only what is trained), the optimizer state, the step and history.

    Written to a temporary file and renamed, so an interrupted save never leaves a broken checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "step": int(step), "module": module.state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "history": list(history or []), "config": dict(config or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Union[str, Path], *, module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    map_location="cpu") -> dict:
    """Load a :func:`save_checkpoint` file into ``module`` (and ``optimizer``); returns the whole state
    (``step``, ``history``, ``config``). A file that is not such a checkpoint gives a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"{path} is not a readable nsa-viz training checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an nsa-viz training checkpoint (format {CHECKPOINT_FORMAT!r})")
    module.load_state_dict(state["module"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


# --------------------------------------------------------------------------- shared loop pieces
def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def _lr_at(step: int, cfg) -> float:
    """Linear warm-up then cosine decay to 10 % of the peak rate."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def summarize_stats(stats: Dict[int, dict]) -> dict:
    """One row of guard figures from per-layer statistics (:meth:`NSARetrofit.stats`): means over layers,
    the worst layer's ``window_like_max`` and ``pick_entropy_ratio_min``, and the layers whose selection
    looks collapsed or whose gates saturated."""
    if not stats:
        return {}
    rows = list(stats.values())
    out = {}
    for key in ("window_like", "pick_entropy_ratio", "distinct_fraction", "gate_cmp", "gate_slc", "gate_win",
                "saturated_cmp", "saturated_slc", "saturated_win"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = float(sum(vals) / len(vals))
    if any("window_like" in r for r in rows):
        out["window_like_max"] = max(r.get("window_like", 0.0) for r in rows)
        out["pick_entropy_ratio_min"] = min(r.get("pick_entropy_ratio", 1.0) for r in rows)
    out["collapsed_layers"] = sorted(int(i) for i, r in stats.items() if r.get("collapsed"))
    out["saturated_layers"] = sorted(int(i) for i, r in stats.items() if r.get("gates_saturated"))
    return out


def _guard_warning(step: int, summary: dict) -> Optional[str]:
    msgs = []
    if summary.get("collapsed_layers"):
        msgs.append(f"selection looks collapsed in layers {summary['collapsed_layers']} (worst layer: window_like "
                    f"{summary.get('window_like_max', 0):.2f}, pick entropy ratio "
                    f"{summary.get('pick_entropy_ratio_min', 1):.2f}); consider entropy_weight > 0")
    if summary.get("saturated_layers"):
        msgs.append(f"gates saturated in layers {summary['saturated_layers']}; lower the learning rate")
    return f"step {step}: " + "; ".join(msgs) if msgs else None


def _frame(history: List[dict]):
    import pandas as pd

    return pd.DataFrame(history)


def _checkpoint_path(checkpoint_dir) -> Optional[Path]:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME


def _resume(path: Optional[Path], resume: bool, module, optimizer, cfg_dict: dict):
    """(start step, history) from ``path`` when resuming, after checking the run's settings match."""
    if path is None or not resume or not path.is_file():
        return 0, []
    state = load_checkpoint(path, module=module, optimizer=optimizer)
    saved = state.get("config", {})
    differs = {k for k in ("seq_len", "batch_size", "seed", "objective", "lr") if k in cfg_dict and
               k in saved and saved[k] != cfg_dict[k]}
    if differs:
        raise ValueError(f"the checkpoint in {path.parent} was written with other settings ({sorted(differs)}: "
                         f"{ {k: saved[k] for k in differs} }); use another checkpoint_dir or resume=False")
    return int(state["step"]), list(state.get("history", []))


def _chunked_kl_lm(model, hidden: torch.Tensor, teacher_hidden: Optional[torch.Tensor], ids: torch.Tensor, *,
                   kl_weight: float, lm_weight: float, temperature: float, chunk: int) -> tuple:
    """Mean KL(teacher || student) of next-token distributions and mean next-token NLL, projecting
    ``chunk`` positions at a time through the output layer under activation checkpointing, so that no
    ``[T, vocabulary]`` tensor is kept for the backward pass."""
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    t = ids.shape[1] - 1
    n = ids.shape[0] * t

    def piece(h, th, tgt):
        logits = head(h).float()
        kl = logits.new_zeros(())
        if th is not None and kl_weight:
            lp = torch.log_softmax(logits / temperature, -1)
            with torch.no_grad():
                lt = torch.log_softmax(head(th).float() / temperature, -1)
            kl = (lt.exp() * (lt - lp)).sum() * temperature ** 2
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")
        return kl, nll

    kl_sum = hidden.new_zeros((), dtype=torch.float32)
    nll_sum = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        th = teacher_hidden[:, s:e] if teacher_hidden is not None else None
        kl, nll = checkpoint(piece, hidden[:, s:e], th, ids[:, s + 1:e + 1], use_reentrant=False)
        kl_sum = kl_sum + kl
        nll_sum = nll_sum + nll
    return kl_sum / n, nll_sum / n


# --------------------------------------------------------------------------- retrofit
@dataclass
class RetrofitConfig:
    """Settings of :func:`retrofit_train` (defaults sized for a CPU; scale them up on a GPU).

    ``objective``: ``"transfer"`` (layer-wise attention transfer, cheap) or ``"kl"`` (end-to-end
    distillation to the dense model's logits, plus ``lm_weight`` times the language-model loss).
    ``transfer_queries``: with ``"transfer"``, train on the last N positions of each window only
    (cost scales with N; every key still counts). ``entropy_weight`` adds the anti-collapse loss and
    ``selection_weight`` the selection-distillation loss of :class:`~nsa_viz.nsa_module.NSAAttention`
    (block scores toward the dense model's block mass: the compression's main teacher in a retrofit);
    ``saturation_weight`` keeps the gates out of the sigmoid's flat ends.
    """

    steps: int = 50
    seq_len: int = 512
    batch_size: int = 1
    lr: float = 2e-3
    warmup: int = 5
    weight_decay: float = 0.0
    objective: str = "transfer"
    transfer_queries: Optional[int] = None
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    entropy_weight: float = 0.0
    selection_weight: float = 0.0
    saturation_weight: float = 0.0
    grad_clip: float = 1.0
    monitor_every: int = 10
    checkpoint_every: int = 10
    seed: int = 0
    logit_chunk: int = 256

    def __post_init__(self):
        if self.objective not in ("transfer", "kl"):
            raise ValueError(f"objective must be 'transfer' or 'kl', got {self.objective!r}")
        for name in ("steps", "seq_len", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RetrofitConfig.{name} must be a positive integer, got {v!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RetrofitConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "kl_weight", "lm_weight", "entropy_weight", "selection_weight",
                     "saturation_weight", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"RetrofitConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.transfer_queries is not None and not 1 <= self.transfer_queries <= self.seq_len:
            raise ValueError(f"RetrofitConfig.transfer_queries must be in [1, seq_len={self.seq_len}] or None, "
                             f"got {self.transfer_queries!r}")
        if self.objective == "kl" and not (self.kl_weight or self.lm_weight):
            raise ValueError("objective='kl' needs kl_weight > 0 or lm_weight > 0")


def freeze(model) -> None:
    """Freeze every parameter of ``model`` (the base of a retrofit)."""
    for p in model.parameters():
        p.requires_grad_(False)


def retrofit_train(model, retrofit: NSARetrofit, stream: TokenStream, config: RetrofitConfig = RetrofitConfig(), *,
                   checkpoint_dir=None, resume: bool = True, progress: bool = True):
    """Train the NSA parameters of ``retrofit`` (installed into the frozen ``model`` for the duration)
    on batches of ``stream``; returns the history as a DataFrame, one row per step: ``step, loss``,
    the objective's parts (``transfer`` or ``kl``/``nll``), ``aux``, ``lr``, ``seconds`` and, every
    ``monitor_every`` steps, the guard figures of :func:`summarize_stats`.

    With ``checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the end,
    and ``resume=True`` continues from it.
    """
    if not isinstance(retrofit, NSARetrofit):
        raise TypeError(f"retrofit must be an NSARetrofit, got {type(retrofit).__name__}")
    cfg = config
    freeze(model)
    params = [p for p in retrofit.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the retrofit has no trainable parameters (learn_compression and learn_gates are off)")
    if retrofit.spec.combine != "gated":
        raise ValueError("training needs combine='gated': in 'union' mode no gradient reaches the NSA parameters")
    device = next(model.parameters()).device
    retrofit.to(device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = _checkpoint_path(checkpoint_dir)
    cfg_dict = dataclasses.asdict(cfg)
    start, history = _resume(ckpt, resume, retrofit, opt, cfg_dict)
    was_training = model.training
    model.eval()          # no dropout in the frozen base; the NSA modules train
    retrofit.train()
    retrofit.set_entropy_weight(cfg.entropy_weight)
    retrofit.set_selection_weight(cfg.selection_weight)
    retrofit.set_saturation_weight(cfg.saturation_weight)
    bar = _progress(cfg.steps, start, f"retrofit ({cfg.objective})", progress)
    try:
        with retrofit.installed(model):
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                monitor = cfg.monitor_every and (step % cfg.monitor_every == 0 or step == cfg.steps - 1)
                retrofit.set_tracking(bool(monitor))
                for grp in opt.param_groups:
                    grp["lr"] = _lr_at(step, cfg)
                ids = stream.batch(step, cfg.batch_size, cfg.seq_len, seed=cfg.seed).to(device)
                row = {"step": step + 1, "lr": opt.param_groups[0]["lr"]}
                if cfg.objective == "transfer":
                    with retrofit.transfer(cfg.transfer_queries):
                        model.get_decoder()(input_ids=ids, use_cache=False)
                        parts = retrofit.transfer_losses
                        loss = torch.stack(parts).mean()
                    row["transfer"] = loss.item()
                else:
                    with torch.no_grad(), retrofit.disabled():
                        teacher = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                    kl, nll = _chunked_kl_lm(model, hidden, teacher, ids, kl_weight=cfg.kl_weight,
                                             lm_weight=cfg.lm_weight, temperature=cfg.temperature, chunk=cfg.logit_chunk)
                    loss = cfg.kl_weight * kl + cfg.lm_weight * nll
                    row.update(kl=kl.item(), nll=nll.item())
                aux = retrofit.aux_loss()
                if aux is not None:
                    loss = loss + aux
                    row["aux"] = aux.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                opt.step()
                row["loss"] = loss.item()
                if monitor:
                    summary = summarize_stats(retrofit.stats())
                    row.update(summary)
                    warn = _guard_warning(step + 1, summary)
                    if warn:
                        bar.write(warn)
                row["seconds"] = time.perf_counter() - t0
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                bar.update(1)
                if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                    save_checkpoint(ckpt, module=retrofit, optimizer=opt, step=step + 1, history=history, config=cfg_dict)
    finally:
        bar.close()
        retrofit.set_tracking(False)
        retrofit.set_entropy_weight(0.0)
        retrofit.set_selection_weight(0.0)
        retrofit.set_saturation_weight(0.0)
        retrofit.eval()
        model.train(was_training)
    return _frame(history)


@torch.no_grad()
def retrofit_perplexity(model, retrofit: Optional[NSARetrofit], windows: Sequence[torch.Tensor], *,
                        label: str = "nsa", chunk: int = 512, progress: bool = True,
                        dense_hidden: Optional[list] = None):
    """Perplexity of ``model`` with ``retrofit`` installed, next to the dense model's, on ``windows``
    (a list of ``[1, T]`` token tensors); one row per window plus a pooled ``"all"`` row:
    ``window, label, tokens, ppl, dense_ppl, ppl_ratio, kl_vs_dense, top1_agree, seconds``.
    ``retrofit=None`` gives the dense model against itself (ratio 1).

    ``dense_hidden``: a list (one slot per window, ``None`` where not known yet) of the dense model's
    final hidden states; empty slots are filled in, so passing the same list to several calls on the
    same windows runs the dense model once per window (at 4k tokens on a CPU that is most of the time)."""
    import pandas as pd

    from .accuracy import compare_hidden

    device = next(model.parameters()).device
    if dense_hidden is not None and len(dense_hidden) != len(windows):
        raise ValueError(f"dense_hidden must have one slot per window ({len(windows)}), got {len(dense_hidden)}")
    rows = []
    bar = _progress(len(windows), 0, f"perplexity ({label})", progress)
    ctx = retrofit.installed(model) if retrofit is not None else _nullcontext()
    was_training = retrofit.training if retrofit is not None else False
    if retrofit is not None:
        retrofit.eval()
    try:
        with ctx:
            for i, ids in enumerate(windows):
                ids = ids.to(device)
                dense = dense_hidden[i] if dense_hidden is not None else None
                if dense is None:
                    if retrofit is not None:
                        with retrofit.disabled():
                            dense = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                    else:
                        dense = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                    if dense_hidden is not None:
                        dense_hidden[i] = dense
                dense = dense.to(device)
                t0 = time.perf_counter()
                hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state if retrofit is not None \
                    else dense
                secs = time.perf_counter() - t0
                m = compare_hidden(model, ids, hidden, dense, chunk)
                rows.append({"window": i, "label": label, **m, "seconds": secs})
                bar.update(1)
    finally:
        bar.close()
        if retrofit is not None:
            retrofit.train(was_training)
    df = pd.DataFrame(rows)
    tok = df["tokens"].sum()
    nll = (df["nll"] * df["tokens"]).sum() / tok
    dense_nll = (df["dense_ppl"].map(math.log) * df["tokens"]).sum() / tok
    pooled = {"window": "all", "label": label, "tokens": int(tok), "nll": nll, "ppl": math.exp(nll),
              "dense_ppl": math.exp(dense_nll), "kl_vs_dense": (df["kl_vs_dense"] * df["tokens"]).sum() / tok,
              "top1_agree": (df["top1_agree"] * df["tokens"]).sum() / tok, "seconds": df["seconds"].sum()}
    df = pd.concat([df, pd.DataFrame([pooled])], ignore_index=True)
    df["ppl_ratio"] = df["ppl"] / df["dense_ppl"]
    return df


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- from scratch
@dataclass
class ScratchConfig:
    """A tiny Llama-style model and its training run (defaults: a few minutes on a 2-core CPU).

    ``entropy_weight`` and ``saturation_weight``: the anti-collapse and anti-saturation losses of
    :class:`~nsa_viz.nsa_module.NSAAttention`. ``gate_init``: the NSA gates' initial values (cmp, slc, win). A model trained from scratch has no dense
    behaviour to preserve, so the branches start even; the retrofit default (mostly ``slc``) puts the
    other two gates near saturation, where a from-scratch model pushes them over within tens of steps.
    """

    steps: int = 200
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    entropy_weight: float = 0.0
    saturation_weight: float = 0.0
    gate_init: Tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    eval_every: int = 50
    eval_batches: int = 4
    monitor_every: int = 25
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "seq_len", "batch_size", "vocab_size", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "intermediate_size", "eval_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ScratchConfig.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ScratchConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ScratchConfig.hidden_size ({self.hidden_size}) must be a multiple of num_heads")


def tiny_llama(cfg: ScratchConfig):
    """A randomly initialised Llama-style causal LM (seeded by ``cfg.seed``), float32, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=max(cfg.seq_len, 2048),
                       attention_dropout=0.0, tie_word_embeddings=True)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(conf)
    model.config._attn_implementation = "sdpa"
    return model.train()


class _ScratchBundle(nn.Module):
    """Model plus (optional) NSA retrofit: what a from-scratch checkpoint holds."""

    def __init__(self, model, retrofit: Optional[NSARetrofit]):
        super().__init__()
        self.model = model
        self.retrofit = retrofit


@torch.no_grad()
def _eval_loss(model, stream: TokenStream, cfg: ScratchConfig, device) -> float:
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        ids = stream.batch(i, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 7919, split="val").to(device)
        losses.append(float(model(input_ids=ids, labels=ids, use_cache=False).loss))
    model.train()
    return sum(losses) / len(losses)


def train_from_scratch(stream: TokenStream, nsa: Optional[NSA] = None, config: ScratchConfig = ScratchConfig(), *,
                       checkpoint_dir=None, resume: bool = True, progress: bool = True, device=None,
                       nsa_backend: str = "auto"):
    """Train a :func:`tiny_llama` on ``stream`` with dense attention (``nsa=None``) or with NSA
    (``nsa`` with ``combine="gated"``: learnable compression and gates, trained together with the
    model). Returns ``(model, retrofit or None, history DataFrame)``; history rows: ``step, loss, lr,
    seconds, elapsed`` and every ``eval_every`` steps ``val_loss``; NSA runs also carry the guard
    figures every ``monitor_every`` steps.

    The initial weights and the batches depend only on ``config.seed``, so a dense and an NSA run
    with the same config differ only by the attention.
    """
    cfg = config
    if nsa is not None and nsa.combine != "gated":
        raise ValueError("training NSA from scratch needs combine='gated' (union mode has no trainable gates)")
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = tiny_llama(cfg).to(device)
    retrofit = None
    if nsa is not None:
        torch.manual_seed(cfg.seed + 1)   # the NSA parameters' own init, not shifting the model's
        retrofit = NSARetrofit(model, nsa, backend=nsa_backend, gate_init=cfg.gate_init)
        retrofit.install(model)
        retrofit.set_entropy_weight(cfg.entropy_weight)
        retrofit.set_saturation_weight(cfg.saturation_weight)
    bundle = _ScratchBundle(model, retrofit).to(device)
    decay = [p for n, p in bundle.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in bundle.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    ckpt = _checkpoint_path(checkpoint_dir)
    cfg_dict = dict(dataclasses.asdict(cfg), attention=repr(nsa) if nsa is not None else "dense")
    start, history = _resume(ckpt, resume, bundle, opt, cfg_dict)
    if start and history and cfg_dict["attention"] != (history[0].get("attention") or cfg_dict["attention"]):
        raise ValueError("the checkpoint was written by a run with another attention")
    elapsed = history[-1]["elapsed"] if history else 0.0
    label = "dense" if nsa is None else "nsa"
    bar = _progress(cfg.steps, start, f"from scratch ({label})", progress)
    bundle.train()
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            monitor = retrofit is not None and cfg.monitor_every and (step % cfg.monitor_every == 0 or step == cfg.steps - 1)
            if retrofit is not None:
                retrofit.set_tracking(bool(monitor))
            for grp in opt.param_groups:
                grp["lr"] = _lr_at(step, cfg)
            ids = stream.batch(step, cfg.batch_size, cfg.seq_len, seed=cfg.seed).to(device)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            loss = out.loss
            row = {"step": step + 1, "attention": cfg_dict["attention"], "lm_loss": loss.item(),
                   "lr": opt.param_groups[0]["lr"]}
            aux = retrofit.aux_loss() if retrofit is not None else None
            if aux is not None:
                loss = loss + aux
                row["aux"] = aux.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(bundle.parameters(), cfg.grad_clip))
            opt.step()
            row["loss"] = loss.item()
            if monitor:
                summary = summarize_stats(retrofit.stats())
                row.update(summary)
                warn = _guard_warning(step + 1, summary)
                if warn:
                    bar.write(warn)
            row["seconds"] = time.perf_counter() - t0
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                if retrofit is not None:
                    retrofit.set_tracking(False)
                row["val_loss"] = _eval_loss(model, stream, cfg, device)
            elapsed += row["seconds"]
            row["elapsed"] = elapsed
            history.append(row)
            bar.set_postfix(loss=f"{row['lm_loss']:.3f}")
            bar.update(1)
            if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(ckpt, module=bundle, optimizer=opt, step=step + 1, history=history, config=cfg_dict)
    finally:
        bar.close()
        if retrofit is not None:
            retrofit.set_tracking(False)
    model.eval()
    return model, retrofit, _frame(history)


def compare_from_scratch(stream: TokenStream, nsa: NSA, config: ScratchConfig = ScratchConfig(), *,
                         checkpoint_dir=None, resume: bool = True, progress: bool = True, device=None,
                         nsa_backend: str = "auto"):
    """Dense and NSA :func:`train_from_scratch` runs with one config; returns ``{"dense": history,
    "nsa": history}`` (checkpoints under ``checkpoint_dir/dense`` and ``checkpoint_dir/nsa``)."""
    out = {}
    for label, att in (("dense", None), ("nsa", nsa)):
        sub = None if checkpoint_dir is None else Path(checkpoint_dir) / label
        _, _, hist = train_from_scratch(stream, att, config, checkpoint_dir=sub, resume=resume, progress=progress,
                                        device=device, nsa_backend=nsa_backend)
        out[label] = hist
    return out


def loss_curves_figure(histories: Dict[str, "object"], *, title: str = "training loss"):
    """A plotly figure of training loss (smoothed) and validation loss per run, against step."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, df in histories.items():
        smooth = df["lm_loss"].rolling(10, min_periods=1).mean() if "lm_loss" in df else df["loss"]
        fig.add_trace(go.Scatter(x=df["step"], y=smooth, mode="lines", name=f"{label} train (10-step mean)"))
        if "val_loss" in df:
            v = df.dropna(subset=["val_loss"])
            fig.add_trace(go.Scatter(x=v["step"], y=v["val_loss"], mode="markers+lines", name=f"{label} validation"))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss (nats/token)")
    return fig


__all__ = ["TokenStream", "save_checkpoint", "load_checkpoint", "RetrofitConfig", "retrofit_train",
           "retrofit_perplexity", "freeze", "ScratchConfig", "tiny_llama", "train_from_scratch", "compare_from_scratch",
           "summarize_stats", "loss_curves_figure"]
