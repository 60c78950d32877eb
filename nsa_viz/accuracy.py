"""Accuracy of sparse patterns against dense attention, as tidy pandas tables.

- :func:`perplexity_table`: per (text, length, pattern) the perplexity, the mean KL divergence of the
  next-token distributions from the dense model's, and top-1 agreement with it. The dense reference
  is the model's own attention; logits are compared chunk by chunk from the final hidden states so
  that no ``T × vocabulary`` tensor is kept for long inputs.
- :func:`passkey_table`: passkey retrieval accuracy over lengths and depths. Prompts are generated
  here from a seed, with filler cut from real text (by default the Python reference manual in
  ``pydoc_data``); success means the model's greedy continuation of the prompt starts with the key,
  checked teacher-forced in one forward pass (the same decision greedy ``generate`` would make).

Patterns are given as ``{label: pattern}`` where a pattern is anything :func:`nsa_viz.models.apply_pattern`
accepts, or ``None`` for the model's own attention.
"""
from __future__ import annotations

import math
import random
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from .models import apply_pattern
from .patterns import Pattern

PASSKEY_INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the pass key.\n\n")
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


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
    """NLL of ``ids[1:]``, KL(dense || pattern) and top-1 agreement from two final hidden states
    ``[1, T, H]``, projecting ``chunk`` positions at a time through the output embedding."""
    head = model.get_output_embeddings()
    t = ids.shape[1] - 1
    nll = nll_dense = kl = agree = 0.0
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        lp = torch.log_softmax(head(hidden[:, s:e]).float(), -1)
        lp0 = torch.log_softmax(head(dense_hidden[:, s:e]).float(), -1)
        tgt = ids[:, s + 1:e + 1].to(lp.device)
        nll += -lp.gather(-1, tgt[..., None]).sum().item()
        nll_dense += -lp0.gather(-1, tgt[..., None]).sum().item()
        kl += (lp0.exp() * (lp0 - lp)).sum().item()
        agree += (lp.argmax(-1) == lp0.argmax(-1)).sum().item()
    return {"tokens": t, "nll": nll / t, "ppl": math.exp(nll / t), "dense_ppl": math.exp(nll_dense / t),
            "kl_vs_dense": kl / t, "top1_agree": agree / t}


def perplexity_table(model, tokenizer, texts: Union[Mapping[str, str], Sequence[str]], patterns,
                     lengths: Union[int, Iterable[int]] = (2048,), *, chunk: int = 512, progress: bool = True):
    """Tidy table, one row per (text, length, pattern): ``text, length, pattern, tokens, nll, ppl,
    dense_ppl, ppl_ratio, kl_vs_dense, top1_agree, seconds``.

    ``texts``: ``{name: text}`` (or a list, named text0, text1, ...); each is cut to its first ``length``
    tokens (a text that is too short is an error, so lengths are what they say). ``patterns``:
    ``{label: pattern or mapping or None}``. The dense reference is the model's own attention
    (``dense_ppl``); ``kl_vs_dense`` is the mean over positions of KL(dense || pattern) in nats;
    ``top1_agree`` the fraction of positions whose argmax token equals the dense one.
    """
    import pandas as pd

    if not isinstance(texts, Mapping):
        texts = {f"text{i}": t for i, t in enumerate(texts)}
    for name, t in texts.items():
        if not isinstance(t, str):
            raise TypeError(f"texts[{name!r}] must be a string, got {type(t).__name__}")
    patterns = _as_named(patterns, "patterns")
    lengths = _check_lengths(lengths)
    device = next(model.parameters()).device
    rows = []
    bar = _progress(len(texts) * len(lengths) * (len(patterns) + 1), "perplexity", progress)
    for name, text in texts.items():
        all_ids = tokenizer(text, return_tensors="pt").input_ids
        for n in lengths:
            if all_ids.shape[1] < n:
                raise ValueError(f"texts[{name!r}] has {all_ids.shape[1]} tokens, fewer than length {n}")
            ids = all_ids[:, :n].to(device)
            dense_hidden = _final_hidden(model, ids)
            bar.update(1)
            for label, pat in patterns.items():
                t0 = time.perf_counter()
                hidden = dense_hidden if pat is None else _run_with(model, pat, lambda: _final_hidden(model, ids))
                secs = time.perf_counter() - t0
                m = compare_hidden(model, ids, hidden, dense_hidden, chunk)
                rows.append({"text": name, "length": n, "pattern": label, **m,
                             "ppl_ratio": m["ppl"] / m["dense_ppl"], "seconds": secs})
                bar.update(1)
    bar.close()
    cols = ["text", "length", "pattern", "tokens", "nll", "ppl", "dense_ppl", "ppl_ratio", "kl_vs_dense",
            "top1_agree", "seconds"]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- passkey
def default_filler() -> str:
    """Prose already on every machine: the Python reference manual topics from ``pydoc_data``."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def passkey_prompt(tokenizer, length: int, depth: float, seed: int, filler_ids: Optional[List[int]] = None,
                   key_digits: int = 5) -> dict:
    """A passkey prompt of exactly ``length`` tokens, the answer included at the end.

    The needle sentence sits at fraction ``depth`` (0 = just after the instructions, 1 = just before
    the question) of the filler, which is a stretch of ``filler_ids`` starting at a seeded offset.
    Returns ``{"input_ids" [1, length], "answer_len", "key", "needle_pos"}``: the last ``answer_len``
    tokens are the key (with its leading space), which the model must produce after the question.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if filler_ids is None:
        filler_ids = tokenizer(default_filler()).input_ids
    rng = random.Random(seed)
    key = str(rng.randint(10 ** (key_digits - 1), 10 ** key_digits - 1))
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids
    intro, needle = enc(PASSKEY_INTRO), enc(PASSKEY_NEEDLE.format(key=key))
    question, answer = enc(PASSKEY_QUESTION), enc(" " + key)
    n_fill = length - len(intro) - len(needle) - len(question) - len(answer)
    if n_fill < 0:
        raise ValueError(f"length {length} is too short for a passkey prompt (needs at least "
                         f"{length - n_fill} tokens)")
    if n_fill > len(filler_ids):
        raise ValueError(f"the filler has {len(filler_ids)} tokens, fewer than the {n_fill} needed for length {length}")
    off = rng.randrange(0, len(filler_ids) - n_fill + 1)
    fill = list(filler_ids[off:off + n_fill])
    cut = int(round(depth * n_fill))
    ids = intro + fill[:cut] + needle + fill[cut:] + question + answer
    return {"input_ids": torch.tensor([ids]), "answer_len": len(answer), "key": key,
            "needle_pos": len(intro) + cut}


@torch.no_grad()
def passkey_correct(model, prompt: dict) -> bool:
    """Whether greedy decoding after the question yields the key: all answer tokens are the argmax
    at their positions given the prompt and the key's previous tokens (one teacher-forced pass)."""
    ids = prompt["input_ids"].to(next(model.parameters()).device)
    na = prompt["answer_len"]
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, -na - 1:-1]
    pred = model.get_output_embeddings()(hidden).argmax(-1)
    return bool(torch.equal(pred[0].cpu(), ids[0, -na:].cpu()))


def passkey_table(model, tokenizer, patterns, lengths: Union[int, Iterable[int]] = (2048,),
                  depths: Sequence[float] = (0.1, 0.5, 0.9), trials: int = 3, *, seed: int = 0,
                  filler: Optional[str] = None, progress: bool = True):
    """Tidy table, one row per (pattern, length, depth, trial): ``pattern, length, depth, trial, key,
    needle_pos, distance, correct``, where ``distance`` is how many tokens before the question the
    needle sits (what a window would have to reach). Summarise with
    ``df.groupby(["pattern", "length"]).correct.mean()``. The same prompts are used for every pattern.
    """
    import pandas as pd

    patterns = _as_named(patterns, "patterns")
    lengths = _check_lengths(lengths)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    filler_ids = tokenizer(filler if filler is not None else default_filler()).input_ids
    prompts = []
    for n in lengths:
        for di, depth in enumerate(depths):
            for t in range(trials):
                p = passkey_prompt(tokenizer, n, float(depth), seed=((seed * 1_000_003 + n) * 1009 + di) * 101 + t,
                                   filler_ids=filler_ids)
                prompts.append((n, float(depth), t, p))
    rows = []
    bar = _progress(len(prompts) * len(patterns), "passkey", progress)
    for label, pat in patterns.items():
        def run_all():
            for n, depth, t, p in prompts:
                ok = passkey_correct(model, p)
                rows.append({"pattern": label, "length": n, "depth": depth, "trial": t, "key": p["key"],
                             "needle_pos": p["needle_pos"], "distance": n - p["answer_len"] - p["needle_pos"],
                             "correct": ok})
                bar.update(1)
        _run_with(model, pat, run_all)
    bar.close()
    return pd.DataFrame(rows)


__all__ = ["perplexity_table", "passkey_table", "passkey_prompt", "passkey_correct", "compare_hidden",
           "default_filler"]
