"""Accuracy of sparse patterns against dense attention, as tidy pandas tables.

- :func:`perplexity_table`: per (text, length, pattern) the perplexity, the mean KL divergence of the
  next-token distributions from the dense model's, and top-1 agreement with it. The dense reference
  is the model's own attention; logits are compared chunk by chunk from the final hidden states so
  that no ``T × vocabulary`` tensor is kept for long inputs.
- :func:`retrieval_table` (and :func:`passkey_table`): passkey / needle / multi-key retrieval accuracy
  over lengths and depths, on the seeded synthetic tasks of :mod:`nsa_viz.data` (filler cut from real
  text, by default the Python reference manual in ``pydoc_data``); success means the model's greedy
  continuation of the prompt is the answer, checked teacher-forced in one forward pass (the same
  decision greedy ``generate`` would make).

Patterns are given as ``{label: pattern}`` where a pattern is anything :func:`nsa_viz.models.apply_pattern`
accepts, or ``None`` for the model's own attention.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from .models import apply_pattern
from .patterns import Pattern



def _as_named(items, what: str) -> Dict[str, object]:
    if isinstance(items, Mapping):
        out = dict(items)
    elif isinstance(items, (list, tuple)):
        out = {}
        for it in items:
            label = "model" if it is None else (it.label if isinstance(it, Pattern) else None)
            if label is None:
                raise TypeError(f"{what}: give a mapping {{label: pattern}} when entries are not Patterns, got {it!r}")
            out[label] = it
    else:
        raise TypeError(f"{what} must be a mapping {{label: value}} or a list, got {type(items).__name__}")
    if not out:
        raise ValueError(f"{what} must not be empty")
    return out


def _check_lengths(lengths) -> List[int]:
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"lengths must be integers >= 2, got {n!r}")
    return lengths


def _run_with(model, pattern, fn):
    """Call ``fn()`` with ``pattern`` applied (None: the model's own attention)."""
    if pattern is None:
        return fn()
    with apply_pattern(model, pattern):
        return fn()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled)


# --------------------------------------------------------------------------- perplexity, KL, agreement
@torch.no_grad()
def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    return model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state


@torch.no_grad()
def compare_hidden(model, ids: torch.Tensor, hidden: torch.Tensor, dense_hidden: torch.Tensor,
                   chunk: int = 512) -> dict:
    """NLL of ``ids[1:]``, KL(dense || pattern), top-1 agreement and the largest absolute logit difference
    from two final hidden states ``[1, T, H]``, projecting ``chunk`` positions at a time through the output
    embedding (logits in the model's dtype, compared in float32)."""
    head = model.get_output_embeddings()
    t = ids.shape[1] - 1
    nll = nll_dense = kl = agree = max_diff = 0.0
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        logits, logits0 = head(hidden[:, s:e]).float(), head(dense_hidden[:, s:e]).float()
        max_diff = max(max_diff, (logits - logits0).abs().max().item())
        lp, lp0 = torch.log_softmax(logits, -1), torch.log_softmax(logits0, -1)
        del logits, logits0
        tgt = ids[:, s + 1:e + 1].to(lp.device)
        nll += -lp.gather(-1, tgt[..., None]).sum().item()
        nll_dense += -lp0.gather(-1, tgt[..., None]).sum().item()
        kl += (lp0.exp() * (lp0 - lp)).sum().item()
        agree += (lp.argmax(-1) == lp0.argmax(-1)).sum().item()
    return {"tokens": t, "nll": nll / t, "ppl": math.exp(nll / t), "dense_ppl": math.exp(nll_dense / t),
            "kl_vs_dense": kl / t, "top1_agree": agree / t, "max_abs_logit_diff": max_diff}


def _token_ids(tokenizer, text) -> torch.Tensor:
    """``[1, T]`` int64 ids of a text (tokenized) or of ids given as a tensor or list."""
    if isinstance(text, str):
        return tokenizer(text, return_tensors="pt").input_ids
    ids = torch.as_tensor(text, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"token ids must be one sequence ([T] or [1, T]), got shape {list(ids.shape)}")
    return ids


def perplexity_table(model, tokenizer, texts: Union[Mapping[str, str], Sequence[str]], patterns,
                     lengths: Union[int, Iterable[int]] = (2048,), *, chunk: int = 512, progress: bool = True):
    """Tidy table, one row per (text, length, pattern): ``text, length, pattern, tokens, nll, ppl,
    dense_ppl, ppl_ratio, kl_vs_dense, top1_agree, seconds``.

    ``texts``: ``{name: text or token ids}`` (or a list, named text0, text1, ...), e.g. the samples of
    ``nsa_viz.data.load_dataset("code").tokenize(tokenizer, length)``; each is cut to its first
    ``length`` tokens (a text that is too short is an error, so lengths are what they say). ``patterns``:
    ``{label: pattern or mapping or None}``. The dense reference is the model's own attention
    (``dense_ppl``); ``kl_vs_dense`` is the mean over positions of KL(dense || pattern) in nats;
    ``top1_agree`` the fraction of positions whose argmax token equals the dense one; ``seconds`` the
    wall time of the forward pass to the final hidden states (for ``None``, the model's own pass).
    """
    import pandas as pd

    if not isinstance(texts, Mapping):
        texts = {f"text{i}": t for i, t in enumerate(texts)}
    for name, t in texts.items():
        if not isinstance(t, (str, torch.Tensor, list, tuple)):
            raise TypeError(f"texts[{name!r}] must be a string or token ids (a tensor or list of ints), "
                            f"got {type(t).__name__}")
    patterns = _as_named(patterns, "patterns")
    lengths = _check_lengths(lengths)
    device = next(model.parameters()).device
    rows = []
    bar = _progress(len(texts) * len(lengths) * (len(patterns) + 1), "perplexity", progress)
    for name, text in texts.items():
        all_ids = _token_ids(tokenizer, text)
        for n in lengths:
            if all_ids.shape[1] < n:
                raise ValueError(f"texts[{name!r}] has {all_ids.shape[1]} tokens, fewer than length {n}")
            ids = all_ids[:, :n].to(device)
            t0 = time.perf_counter()
            dense_hidden = _final_hidden(model, ids)
            dense_secs = time.perf_counter() - t0
            bar.update(1)
            for label, pat in patterns.items():
                t0 = time.perf_counter()
                hidden = dense_hidden if pat is None else _run_with(model, pat, lambda: _final_hidden(model, ids))
                secs = dense_secs if pat is None else time.perf_counter() - t0
                m = compare_hidden(model, ids, hidden, dense_hidden, chunk)
                rows.append({"text": name, "length": n, "pattern": label, **m,
                             "ppl_ratio": m["ppl"] / m["dense_ppl"], "seconds": secs})
                bar.update(1)
    bar.close()
    cols = ["text", "length", "pattern", "tokens", "nll", "ppl", "dense_ppl", "ppl_ratio", "kl_vs_dense",
            "top1_agree", "seconds"]
    return pd.DataFrame(rows, columns=cols)


def default_filler() -> str:
    """Prose already on every machine: the Python reference manual (``pydoc_data.topics``), topics in
    sorted order joined by blank lines; long enough for perplexity at 32k tokens and more."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


# --------------------------------------------------------------------------- retrieval (passkey, needle, multi-key)
TASKS = ("passkey", "needle", "multikey")


def retrieval_prompts(tokenizer, task: str = "passkey", lengths: Union[int, Iterable[int]] = (2048,),
                      depths: Sequence[float] = (0.1, 0.5, 0.9), trials: int = 3, *, seed: int = 0,
                      filler="docs") -> List[dict]:
    """Prompts of exactly each length from the synthetic tasks of :mod:`nsa_viz.data`, with their answers.

    ``task``: ``"passkey"`` (a 5-digit key), ``"needle"`` (a 7-digit "special magic number") or
    ``"multikey"`` (several named keys, one asked; its depths are drawn by the task, ``depths`` is not
    used). ``trials`` prompts per (length, depth), seeded per length. ``filler``: a built-in corpus
    name of :mod:`nsa_viz.data` (``"docs"``, ``"code"``, ``"legal"``) or a ``Dataset``.

    Each prompt: ``{"length", "depth", "trial", "input_ids" [1, length + answer_len] (the prompt, then
    the answer tokens), "answer_len", "answer", "needle_pos", "distance"}``: the last ``answer_len``
    tokens are the answer (with its leading space); ``needle_pos`` is the first token of the hidden
    fact and ``distance`` how far before the answer it sits (what a window would have to reach).
    """
    from . import data

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    lengths = _check_lengths(lengths)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    depths = [float(d) for d in ([depths] if isinstance(depths, (int, float)) else depths)]
    if not depths:
        raise ValueError("depths must not be empty")
    out = []
    for n in lengths:
        task_seed = seed * 1_000_003 + n  # other keys at each length, the same ones for every pattern
        if task == "passkey":
            ds = data.passkey_task(len(depths) * trials, n, tokenizer=tokenizer, seed=task_seed, depths=depths,
                                   filler=filler)
            labels = [(depths[i % len(depths)], i // len(depths)) for i in range(len(ds))]
        elif task == "needle":
            ds = data.needle_task(n, depths=depths, per_depth=trials, tokenizer=tokenizer, seed=task_seed,
                                  filler=filler)
            labels = [(d, t) for d in depths for t in range(trials)]
        else:
            ds = data.multikey_task(trials, n, tokenizer=tokenizer, seed=task_seed, filler=filler)
            labels = [(float(doc.meta["depths"][doc.meta["asked"]]), t) for t, doc in enumerate(ds)]
        for doc, (depth, trial) in zip(ds, labels):
            answer = data.encode(tokenizer, " " + doc.meta["answer"], special=False)
            span_name = {"passkey": "passkey", "needle": "needle"}.get(task, doc.meta.get("asked"))
            needle_pos = int(doc.meta["spans"][span_name][0])
            ids = list(doc.token_ids) + answer
            out.append({"task": task, "length": n, "depth": depth, "trial": trial,
                        "input_ids": torch.tensor([ids]), "answer_len": len(answer), "answer": doc.meta["answer"],
                        "needle_pos": needle_pos, "distance": n - needle_pos})
    return out


@torch.no_grad()
def answer_correct(model, prompt: dict) -> bool:
    """Whether greedy decoding after the prompt yields the answer: every answer token is the argmax at
    its position given the prompt and the answer's earlier tokens (one teacher-forced forward pass,
    the decision greedy ``generate`` would make token by token)."""
    ids = prompt["input_ids"].to(next(model.parameters()).device)
    na = prompt["answer_len"]
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, -na - 1:-1]
    pred = model.get_output_embeddings()(hidden).argmax(-1)
    return bool(torch.equal(pred[0].cpu(), ids[0, -na:].cpu()))


passkey_correct = answer_correct  # the name earlier callers used


def retrieval_table(model, tokenizer, patterns, task: str = "passkey", lengths: Union[int, Iterable[int]] = (2048,),
                    depths: Sequence[float] = (0.1, 0.5, 0.9), trials: int = 3, *, seed: int = 0, filler="docs",
                    progress: bool = True):
    """Tidy table, one row per (pattern, length, depth, trial): ``task, pattern, length, depth, trial,
    answer, needle_pos, distance, correct``. The same prompts (:func:`retrieval_prompts`) are used for
    every pattern. Summarise with ``df.groupby(["pattern", "length"]).correct.mean()``."""
    import pandas as pd

    patterns = _as_named(patterns, "patterns")
    prompts = retrieval_prompts(tokenizer, task, lengths, depths, trials, seed=seed, filler=filler)
    rows = []
    bar = _progress(len(prompts) * len(patterns), task, progress)
    for label, pat in patterns.items():
        def run_all():
            for p in prompts:
                ok = answer_correct(model, p)
                rows.append({"task": task, "pattern": label, "length": p["length"], "depth": p["depth"],
                             "trial": p["trial"], "answer": p["answer"], "needle_pos": p["needle_pos"],
                             "distance": p["distance"], "correct": ok})
                bar.update(1)
        _run_with(model, pat, run_all)
    bar.close()
    cols = ["task", "pattern", "length", "depth", "trial", "answer", "needle_pos", "distance", "correct"]
    return pd.DataFrame(rows, columns=cols)


def passkey_table(model, tokenizer, patterns, lengths: Union[int, Iterable[int]] = (2048,),
                  depths: Sequence[float] = (0.1, 0.5, 0.9), trials: int = 3, *, seed: int = 0, filler="docs",
                  progress: bool = True):
    """:func:`retrieval_table` for the passkey task (a ``key`` column repeats ``answer``)."""
    df = retrieval_table(model, tokenizer, patterns, "passkey", lengths, depths, trials, seed=seed, filler=filler,
                         progress=progress)
    df["key"] = df["answer"]
    return df


__all__ = ["perplexity_table", "retrieval_table", "passkey_table", "retrieval_prompts", "answer_correct",
           "passkey_correct", "compare_hidden", "default_filler", "TASKS"]
