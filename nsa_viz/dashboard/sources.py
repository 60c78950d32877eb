"""The token ids the dashboard records: one seeded sample of ``nsa_viz.data`` at the asked length.

Choices: the built-in corpora (``docs``, ``code``, ``legal``: real text already on the machine), the
synthetic ``passkey`` task (a key hidden in filler, asked for at the end: a good query for the NSA
explorer) or the user's own file, folder or JSONL (``file`` with a path). Bad data raises
``nsa_viz.data.DataError`` (a ValueError) naming the file; the dashboard shows it as a message.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

DATASETS = ("docs", "code", "legal", "passkey")
FILE = "file"
CHOICES = (("docs: Python reference manual", "docs"), ("code: Python standard library", "code"),
           ("legal: license texts", "legal"), ("passkey: a key hidden in filler text", "passkey"),
           ("my file, folder or JSONL…", FILE))


def sample_ids(choice: str, tokenizer, length: int, *, path: str = "", seed: int = 0) -> Tuple[torch.Tensor, str]:
    """(ids ``[1, length]``, one line saying where they came from) for a dataset choice."""
    from .. import data

    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"tokens must be an integer >= 2, got {length!r}")
    if choice == "passkey":
        ds = data.load_dataset("passkey", length=length, tokenizer=tokenizer, n=1, seed=seed)
    elif choice == FILE:
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise ValueError("give the path of a text file, a folder of text files or a JSONL file")
        p = os.path.expanduser(str(path).strip())
        if not os.path.exists(p):
            raise ValueError(f"{p!r} does not exist")
        ds = data.load_user_data(p)
    elif choice in DATASETS:
        ds = data.load_dataset(choice)
    else:
        raise ValueError(f"dataset must be one of {DATASETS} or {FILE!r}, got {choice!r}")
    samples = ds.tokenize(tokenizer, length, n=1, seed=seed)
    sample = samples.samples[0]
    where = f"{ds.description or ds.name}: {sample.source}"
    meta = dict(sample.meta or {})
    if meta.get("task") == "passkey":
        where += f" (the key {meta.get('answer')} sits at {float(meta.get('depth', 0)):.0%} depth)"
    if samples.short and choice == FILE:
        where += f"; {len(samples.short)} document(s) shorter than {length} tokens were packed together"
    return sample.ids.reshape(1, -1).long(), where


__all__ = ["DATASETS", "FILE", "CHOICES", "sample_ids"]
