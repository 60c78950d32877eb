"""Datasets for the locality audit: real text already on the machine, synthetic retrieval tasks, user files.

Built-in corpora are read where they live and never copied into the repository:

- ``code``: Python standard-library modules (``sysconfig.get_paths()["stdlib"]``, test packages left out);
- ``docs``: the Python reference manual shipped as ``pydoc_data.topics`` (one document per topic);
- ``legal``: license texts under ``/usr/share/common-licenses`` (symlinked duplicates read once), or the
  LICENSE / COPYING files of installed Python packages where that folder is missing.

Every :class:`Document` keeps its ``source`` (a file path, ``pydoc_data.topics:<topic>``, ``texts[i]``,
``file.jsonl:<line>``) so a measurement can be traced back to the text it came from. Sampling is seeded and
prefix-stable: ``sample(16, seed)`` is the first half of ``sample(32, seed)``, so cached audit results
are reused when more documents are asked for.

Synthetic long-context tasks (:func:`passkey_task`, :func:`needle_task`, :func:`multikey_task`) hide facts
in filler taken from the real corpora; with a tokenizer they are built to an exact token length and carry
their token ids and the token span of each hidden fact.

:meth:`Dataset.tokenize` cuts documents into windows of exactly ``length`` tokens or packs short ones
together; documents shorter than asked are reported in :attr:`TokenizedSet.short`, never padded.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

LICENSES_DIR = "/usr/share/common-licenses"
# standard-library folders that hold tests, bundled third-party code or the IDE, not library modules
STDLIB_EXCLUDED = ("test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages",
                   "__pycache__", "ensurepip", "pydoc_data")  # pydoc_data is the docs corpus
LICENSE_NAMES = ("LICENSE", "LICENCE", "COPYING", "LICENSE.txt", "LICENSE.md", "LICENSE.rst", "COPYING.txt",
                 "LICENCE.txt", "COPYING.md")
PACK_SEPARATOR = "\n\n"
MODES = ("auto", "cut", "pack")
BINARY_SNIFF_BYTES = 8192


class DataError(ValueError):
    """A user file or text that cannot be used as a document; the message names the file (and line)."""


# --------------------------------------------------------------------------- documents and datasets
@dataclass(frozen=True, eq=False)
class Document:
    """One text with where it came from.

    ``token_ids``: set by the synthetic tasks when they were built for a tokenizer: the exact ids to
    feed the model (the text is then for reading only). ``meta``: anything else (task answer, depth...).
    """

    text: str
    source: str
    meta: Mapping = field(default_factory=dict)
    token_ids: Optional[Tuple[int, ...]] = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Document({self.source!r}, {len(self.text)} chars)"


class Dataset:
    """An ordered list of :class:`Document` with a name; ``sample`` and ``tokenize`` are seeded."""

    def __init__(self, name: str, documents: Sequence[Document], description: str = "",
                 skipped: Sequence[Tuple[str, str]] = ()):
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        docs = list(documents)
        for i, d in enumerate(docs):
            if not isinstance(d, Document):
                raise TypeError(f"documents[{i}] must be a nsa_viz.data.Document, got {type(d).__name__}")
        self.name = name
        self.documents: List[Document] = docs
        self.description = description
        self.skipped: List[Tuple[str, str]] = list(skipped)  # (source, reason) of files left out

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Dataset(self.name, self.documents[i], self.description)
        return self.documents[i]

    def __repr__(self) -> str:
        chars = sum(len(d.text) for d in self.documents)
        return f"Dataset({self.name!r}, {len(self)} documents, {chars} chars)"

    def order(self, seed: int = 0) -> List[int]:
        """The seeded permutation of document indices that ``sample`` and ``tokenize`` walk."""
        _check_seed(seed)
        idx = list(range(len(self.documents)))
        random.Random(seed).shuffle(idx)
        return idx

    def sample(self, n: Optional[int] = None, seed: int = 0) -> "Dataset":
        """``n`` documents in seeded order (all when ``n`` is None); the first ``m < n`` are ``sample(m, seed)``."""
        idx = self.order(seed)
        if n is not None:
            _check_count("n", n)
            idx = idx[:n]
        return Dataset(self.name, [self.documents[i] for i in idx], self.description, self.skipped)

    def fingerprint(self) -> str:
        """sha256 over every document's source and text (changes when a file on disk changes)."""
        h = hashlib.sha256()
        for d in self.documents:
            h.update(d.source.encode("utf-8") + b"\0" + d.sha256.encode() + b"\0")
        return h.hexdigest()

    def manifest(self) -> dict:
        """What the dataset was built from (sources, sizes, hashes), never the texts themselves."""
        return {"name": self.name, "description": self.description, "n_documents": len(self),
                "fingerprint": self.fingerprint(),
                "documents": [{"source": d.source, "chars": len(d.text), "sha256": d.sha256,
                               **({"meta": _jsonable(d.meta)} if d.meta else {})} for d in self.documents],
                "skipped": [{"source": s, "reason": r} for s, r in self.skipped]}

    def write_manifest(self, path) -> None:
        with open(os.fspath(path), "w", encoding="utf-8") as f:
            json.dump(self.manifest(), f, indent=1)
            f.write("\n")

    def tokenize(self, tokenizer, length: int, n: Optional[int] = None, seed: int = 0, mode: str = "auto",
                 max_windows_per_doc: int = 4) -> "TokenizedSet":
        """Samples of exactly ``length`` tokens (see :func:`to_token_length`)."""
        return to_token_length(self, tokenizer, length, n=n, seed=seed, mode=mode,
                               max_windows_per_doc=max_windows_per_doc)


def _jsonable(meta: Mapping) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
            out[str(k)] = v
        except TypeError:
            out[str(k)] = repr(v)
    return out


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def _check_count(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------- reading files
def read_text_file(path, encoding: str = "utf-8") -> str:
    """The text of one file, or a :class:`DataError` naming it when it is missing, binary, not valid
    ``encoding`` or empty."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    if b"\0" in raw[:BINARY_SNIFF_BYTES]:
        raise DataError(f"{path}: looks like a binary file (NUL bytes), not text")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid {encoding} text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        f"pass encoding= with the file's encoding") from None
    except LookupError:
        raise ValueError(f"encoding must be a codec name Python knows, got {encoding!r}") from None
    if not text.strip():
        raise DataError(f"{path}: the file holds only whitespace")
    return text


def _walk_files(root: str, suffixes: Optional[Sequence[str]], excluded: Sequence[str] = ()) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # sorted, hidden and excluded folders pruned in place so the walk itself is deterministic
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in excluded)
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            if suffixes is not None and not fn.endswith(tuple(suffixes)):
                continue
            out.append(os.path.join(dirpath, fn))
    return out


# --------------------------------------------------------------------------- built-in corpora
def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def code_dataset(root: Optional[str] = None, *, excluded: Sequence[str] = STDLIB_EXCLUDED,
                 on_error: str = "skip") -> Dataset:
    """Python modules under ``root`` (default: this interpreter's standard library, test packages excluded).

    Files that cannot be read as UTF-8 text are skipped and listed in ``Dataset.skipped`` (the standard
    library holds a few deliberately broken encodings); ``on_error="raise"`` raises instead.
    """
    root = stdlib_dir() if root is None else os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: code root folder does not exist")
    docs, skipped = _read_files(_walk_files(root, (".py",), excluded), on_error=on_error)
    if not docs:
        raise DataError(f"{root}: no readable .py files")
    return Dataset("code", docs, f"Python modules under {root}", skipped)


def docs_dataset(topics: Optional[Mapping[str, str]] = None) -> Dataset:
    """The Python reference manual as shipped in ``pydoc_data.topics``: one document per topic (sorted by name)."""
    if topics is None:
        from pydoc_data.topics import topics as shipped

        topics = shipped
    if not isinstance(topics, Mapping):
        raise TypeError(f"topics must be a mapping of topic name to text, got {type(topics).__name__}")
    docs = [Document(text, f"pydoc_data.topics:{name}") for name, text in sorted(topics.items())
            if isinstance(text, str) and text.strip()]
    if not docs:
        raise DataError("pydoc_data.topics holds no text")
    return Dataset("docs", docs, "Python reference manual (pydoc_data.topics)")


def legal_dataset(root: Optional[str] = LICENSES_DIR, *, package_dirs: Optional[Sequence[str]] = None) -> Dataset:
    """License texts under ``root`` (symlinks to a file already read are skipped), or, when ``root`` is
    missing or empty, the LICENSE/COPYING files of installed packages found under ``package_dirs``
    (default: this interpreter's site-packages), one per distinct text."""
    docs: List[Document] = []
    skipped: List[Tuple[str, str]] = []
    if root is not None and os.path.isdir(root):
        seen = set()
        # real files before symlinks, so a duplicate is reported under its alias name
        for path in sorted(_walk_files(os.fspath(root), None), key=lambda p: (os.path.islink(p), p)):
            real = os.path.realpath(path)
            if real in seen:
                skipped.append((path, f"same file as {real}"))
                continue
            seen.add(real)
            got, bad = _read_files([path], on_error="skip")
            docs += got
            skipped += bad
        where = f"license texts under {root}"
    if not docs:
        docs, skipped = _package_licenses(package_dirs)
        where = "LICENSE files of installed Python packages"
    if not docs:
        raise DataError(f"no license texts found: {root} is missing or empty and no installed package ships a "
                        f"LICENSE/COPYING file")
    return Dataset("legal", docs, where, skipped)


def _package_licenses(package_dirs: Optional[Sequence[str]]) -> Tuple[List[Document], List[Tuple[str, str]]]:
    if package_dirs is None:
        import site

        package_dirs = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    candidates = []
    for base in package_dirs:
        if not os.path.isdir(base):
            continue
        for entry in sorted(os.listdir(base)):
            meta_dir = os.path.join(base, entry)
            if not (entry.endswith(".dist-info") and os.path.isdir(meta_dir)):
                continue
            for path in _walk_files(meta_dir, None):
                if os.path.basename(path) in LICENSE_NAMES:
                    candidates.append(path)
    got, skipped = _read_files(candidates, on_error="skip")
    docs, seen = [], set()
    for d in got:  # many packages ship the same MIT/BSD text: keep one of each
        if d.sha256 in seen:
            skipped.append((d.source, "same text as an earlier license file"))
            continue
        seen.add(d.sha256)
        docs.append(d)
    return docs, skipped


# --------------------------------------------------------------------------- user data
def _read_files(paths: Iterable[str], *, encoding: str = "utf-8", on_error: str = "raise"):
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    docs, skipped = [], []
    for p in paths:
        try:
            docs.append(Document(read_text_file(p, encoding), p))
        except DataError as exc:
            if on_error == "raise":
                raise
            skipped.append((p, str(exc)))
    return docs, skipped


def from_texts(texts: Sequence[str], name: str = "texts") -> Dataset:
    """A dataset from a Python list of strings; sources are ``texts[i]``."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    docs = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"texts[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise DataError(f"texts[{i}] is empty")
        docs.append(Document(t, f"{name}[{i}]"))
    if not docs:
        raise DataError(f"{name}: the list of texts is empty")
    return Dataset(name, docs, f"{len(docs)} texts given in Python")


def from_jsonl(path, text_field: str = "text", encoding: str = "utf-8") -> Dataset:
    """One document per line of a JSONL file (``text_field`` of each object); sources are ``path:line``."""
    path = os.fspath(path)
    text = read_text_file(path, encoding)
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        docs.append(_record_text(obj, text_field, where))
    if not docs:
        raise DataError(f"{path}: no JSON records")
    return Dataset(os.path.basename(path), docs, f"records of {path} (field {text_field!r})")


def from_json(path, text_field: str = "text", encoding: str = "utf-8") -> Dataset:
    """A JSON file holding a list of strings or of objects with ``text_field``; sources are ``path[i]``."""
    path = os.fspath(path)
    try:
        data = json.loads(read_text_file(path, encoding))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of strings or objects, got {type(data).__name__}")
    docs = [_record_text(obj, text_field, f"{path}[{i}]") for i, obj in enumerate(data)]
    if not docs:
        raise DataError(f"{path}: the list is empty")
    return Dataset(os.path.basename(path), docs, f"records of {path} (field {text_field!r})")


def _record_text(obj, text_field: str, where: str) -> Document:
    if isinstance(obj, str):
        value = obj
    elif isinstance(obj, dict):
        if text_field not in obj:
            raise DataError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, obj)) or 'none'}); "
                            f"pass text_field= to choose another")
        value = obj[text_field]
    else:
        raise DataError(f"{where}: expected an object with field {text_field!r}, got {type(obj).__name__}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {text_field!r} is empty")
    return Document(value, where)


def from_folder(path, *, suffixes: Optional[Sequence[str]] = None, encoding: str = "utf-8",
                on_error: str = "raise") -> Dataset:
    """Every file under a folder (recursively, hidden ones left out, sorted), one document each.

    ``suffixes`` keeps only names ending so (e.g. ``(".md", ".txt")``). A binary, empty or badly encoded
    file raises a :class:`DataError` naming it; ``on_error="skip"`` leaves it out and lists it in
    ``Dataset.skipped`` instead.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such folder")
    files = _walk_files(path, suffixes)
    if not files:
        raise DataError(f"{path}: the folder holds no files" + (f" ending in {tuple(suffixes)}" if suffixes else ""))
    try:
        docs, skipped = _read_files(files, encoding=encoding, on_error=on_error)
    except DataError as exc:
        raise DataError(f"{exc} (in folder {path}; on_error='skip' leaves such files out)") from None
    if not docs:
        raise DataError(f"{path}: no readable text file (skipped: {'; '.join(r for _, r in skipped)})")
    return Dataset(os.path.basename(os.path.normpath(path)) or path, docs, f"files under {path}", skipped)


def load_user_data(data, *, text_field: str = "text", encoding: str = "utf-8", on_error: str = "raise",
                   name: Optional[str] = None) -> Dataset:
    """A user's data as a :class:`Dataset`: a list of strings, a folder, a ``.jsonl``/``.ndjson`` file, a
    ``.json`` list, or any other text file (one document)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (list, tuple)):
        return from_texts(data, name or "texts")
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be a path, a list of strings or a Dataset, got {type(data).__name__}")
    path = os.fspath(data)
    if os.path.isdir(path):
        ds = from_folder(path, encoding=encoding, on_error=on_error)
    elif path.endswith((".jsonl", ".ndjson")):
        ds = from_jsonl(path, text_field, encoding)
    elif path.endswith(".json"):
        ds = from_json(path, text_field, encoding)
    else:
        ds = Dataset(os.path.basename(path), [Document(read_text_file(path, encoding), path)], f"the file {path}")
    if name:
        ds.name = name
    return ds


# --------------------------------------------------------------------------- tokenisation to a length
@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of the document ``source`` sit at ``[offset, offset + end - start)`` of a sample."""

    source: str
    start: int
    end: int
    offset: int


@dataclass
class Sample:
    """``ids [length]`` (int64) fed to the model, and where each stretch of it came from."""

    ids: torch.Tensor
    spans: Tuple[Span, ...]
    meta: Mapping = field(default_factory=dict)

    @property
    def source(self) -> str:
        """The sources of the sample, joined with ``+`` when several documents were packed."""
        return " + ".join(s.source for s in self.spans)

    def digest(self) -> str:
        return hashlib.sha256(self.ids.to(torch.int64).numpy().tobytes()).hexdigest()


@dataclass
class TokenizedSet:
    """Samples of exactly ``length`` tokens, plus what could not be used as asked.

    ``short``: ``(source, n_tokens, what happened)`` for documents shorter than ``length`` (``"packed"``
    with others, or ``"skipped"``); ``requested`` the number asked for (``len(samples)`` may be smaller).
    """

    name: str
    length: int
    mode: str
    samples: List[Sample]
    short: List[Tuple[str, int, str]]
    requested: Optional[int]
    seed: int

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    @property
    def ids(self) -> torch.Tensor:
        """``[N, length]`` int64."""
        return torch.stack([s.ids for s in self.samples]) if self.samples else torch.zeros(0, self.length,
                                                                                          dtype=torch.long)

    def report(self) -> str:
        """One line for people: how many samples, from how many documents, what was short."""
        msg = f"{self.name}: {len(self)} samples of {self.length} tokens ({self.mode})"
        if self.requested is not None and len(self) < self.requested:
            msg += f", {self.requested} asked for"
        if self.short:
            packed = sum(1 for s in self.short if s[2] == "packed")
            unused = sum(1 for s in self.short if s[2].startswith("not used"))
            msg += f"; {len(self.short)} documents shorter than {self.length} tokens ({packed} packed, " \
                   f"{len(self.short) - packed - unused} skipped, {unused} not needed)"
        return msg


def encode(tokenizer, text: str, special: bool = True) -> List[int]:
    """Token ids of ``text`` with a Hugging Face style tokenizer (``tokenizer(text).input_ids``)."""
    try:
        enc = tokenizer(text, add_special_tokens=special)
    except TypeError:
        enc = tokenizer(text)
    ids = getattr(enc, "input_ids", None)
    if ids is None and isinstance(enc, Mapping):
        ids = enc.get("input_ids")
    if ids is None:
        raise TypeError(f"tokenizer must return an object with input_ids, got {type(enc).__name__}")
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    if ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return [int(i) for i in ids]


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Text of ``ids`` (``tokenizer.decode`` or, failing that, the joined token strings)."""
    if hasattr(tokenizer, "decode"):
        return tokenizer.decode(list(ids))
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return "".join(tokenizer.convert_ids_to_tokens(list(ids)))
    raise TypeError("tokenizer needs decode() or convert_ids_to_tokens() to rebuild text")


def to_token_length(dataset: Dataset, tokenizer, length: int, *, n: Optional[int] = None, seed: int = 0,
                    mode: str = "auto", max_windows_per_doc: int = 4,
                    chars_per_token_cap: int = 16) -> TokenizedSet:
    """Samples of exactly ``length`` tokens from ``dataset`` in seeded order, none padded.

    ``mode``: ``"cut"`` takes consecutive non-overlapping windows of ``length`` tokens from each document
    long enough (at most ``max_windows_per_doc`` each; first windows of every document before second
    ones, so samples spread over documents) and skips shorter documents; ``"pack"`` joins documents (with
    a blank line between them) into one stream cut every ``length`` tokens; ``"auto"`` cuts the documents
    that are long enough and packs the others. Documents shorter than ``length`` are listed in ``short``.
    Synthetic documents that carry ``token_ids`` are used as they are when of exactly ``length`` tokens.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a nsa_viz.data.Dataset, got {type(dataset).__name__}")
    _check_count("length", length, 2)
    if n is not None:
        _check_count("n", n)
    _check_count("max_windows_per_doc", max_windows_per_doc)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    want = n if n is not None else float("inf")
    rounds: List[List[Sample]] = [[] for _ in range(max_windows_per_doc)]
    short: List[Tuple[str, int, str]] = []
    stream: List[Tuple[str, List[int]]] = []
    pack_mode = mode == "pack"
    for i in dataset.order(seed):
        if len(rounds[0]) >= want:
            break
        doc = dataset.documents[i]
        if doc.token_ids is not None:
            ids = list(doc.token_ids)
        else:
            # only the part that windows can use is tokenised (long files, bounded cost)
            cap = (max_windows_per_doc if not pack_mode else 1) * length * chars_per_token_cap
            ids = encode(tokenizer, doc.text[:cap], special=True)
        if pack_mode:
            stream.append((doc.source, ids))
            if sum(len(x) for _, x in stream) >= want * length + length:
                break
            continue
        if len(ids) < length:
            short.append((doc.source, len(ids), "packed" if mode == "auto" and doc.token_ids is None else "skipped"))
            if mode == "auto" and doc.token_ids is None:
                stream.append((doc.source, ids))
            continue
        if doc.token_ids is not None and len(ids) != length:
            short.append((doc.source, len(ids), "skipped: synthetic sample built for another length"))
            continue
        for w in range(min(max_windows_per_doc, len(ids) // length)):
            chunk = ids[w * length:(w + 1) * length]
            rounds[w].append(Sample(torch.tensor(chunk, dtype=torch.long),
                                    (Span(doc.source, w * length, (w + 1) * length, 0),), dict(doc.meta)))
    samples = list(rounds[0])
    if stream:
        packed, packed_short = _pack(stream, tokenizer, length)
        samples += packed
        if pack_mode:
            short += packed_short
    for r in rounds[1:]:
        samples += r
    if n is not None:
        samples = samples[:n]
    used = {sp.source for s in samples for sp in s.spans}
    # a short document queued for packing but not needed (enough longer ones) was not used after all
    short = [(src, cnt, what if what != "packed" or src in used else "not used (enough longer documents)")
             for src, cnt, what in short]
    if not samples:
        raise DataError(f"{dataset.name}: no sample of {length} tokens can be made ({len(short)} documents are "
                        f"shorter{'; try mode=pack' if mode == 'cut' else ''})")
    out = TokenizedSet(dataset.name, length, mode, samples, short, n, seed)
    if n is not None and len(samples) < n:
        warnings.warn(out.report(), stacklevel=2)
    return out


def _pack(stream: List[Tuple[str, List[int]]], tokenizer, length: int):
    """Concatenate (source, ids) with a separator and cut into samples of ``length``; the rest is reported."""
    sep = encode(tokenizer, PACK_SEPARATOR, special=False)
    samples, short = [], []
    cur: List[int] = []
    spans: List[Span] = []
    for k, (source, ids) in enumerate(stream):
        piece = ids if k == 0 else sep + ids
        start_in_doc = 0 if k == 0 else -len(sep)  # separator tokens are not part of the document
        pos = 0
        while pos < len(piece):
            take = min(length - len(cur), len(piece) - pos)
            d0, d1 = start_in_doc + pos, start_in_doc + pos + take
            if d1 > 0:  # record only the document's own tokens
                spans.append(Span(source, max(d0, 0), d1, len(cur) + max(0, -d0)))
            cur += piece[pos:pos + take]
            pos += take
            if len(cur) == length:
                samples.append(Sample(torch.tensor(cur, dtype=torch.long), tuple(spans), {"packed": True}))
                cur, spans = [], []
    if cur:
        short.append((" + ".join(s.source for s in spans) or "separator", len(cur), "skipped: packed remainder"))
    return samples, short


# --------------------------------------------------------------------------- synthetic retrieval tasks
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it later.\n\n")
NAMES = ("amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper",
         "kestrel", "lumen", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra")


def _filler_dataset(filler) -> Dataset:
    if isinstance(filler, Dataset):
        return filler
    if filler in BUILTIN:
        return BUILTIN[filler]()
    raise ValueError(f"filler must be one of {tuple(BUILTIN)} or a Dataset, got {filler!r}")


class _Filler:
    """Filler text drawn from a real corpus, starting at a seeded document, in tokens (or characters)."""

    def __init__(self, filler, tokenizer, rng: random.Random):
        self.ds = _filler_dataset(filler)
        self.tok = tokenizer
        self.rng = rng

    def take(self, count: int) -> Tuple[List[int], str]:
        """(ids, text) of ``count`` filler tokens (characters when no tokenizer; ids then empty)."""
        order = list(range(len(self.ds)))
        self.rng.shuffle(order)
        text, ids = "", []
        for i in order:
            piece = self.ds.documents[i].text + PACK_SEPARATOR
            if self.tok is None:
                text += piece
                if len(text) >= count:
                    return [], text[:count]
            else:
                ids += encode(self.tok, piece, special=False)
                if len(ids) >= count:
                    ids = ids[:count]
                    return ids, decode(self.tok, ids)
        raise DataError(f"filler corpus {self.ds.name!r} holds fewer than {count} "
                        f"{'tokens' if self.tok else 'characters'}")


def _build_task(parts: List[Tuple[str, str]], insert: List[Tuple[float, str, str]], length: int, tokenizer,
                filler: _Filler, source: str, meta: dict) -> Document:
    """Assemble ``intro parts + filler with facts inserted at depths + closing parts`` to ``length``.

    ``parts``: [(role, text)] with role "head" (before the filler) or "tail" (after); ``insert``:
    [(depth in [0, 1], name, text)] placed inside the filler. Spans of inserted facts go in
    ``meta["spans"]`` (token positions with a tokenizer, character positions without).
    """
    head = [t for r, t in parts if r == "head"]
    tail = [t for r, t in parts if r == "tail"]
    enc = (lambda t, sp=False: encode(tokenizer, t, special=sp)) if tokenizer is not None else (lambda t, sp=False: list(t))
    head_ids = [enc(t, k == 0) for k, t in enumerate(head)]
    tail_ids = [enc(t) for t in tail]
    ins_ids = [enc(t) for _, _, t in insert]
    fixed = sum(map(len, head_ids)) + sum(map(len, tail_ids)) + sum(map(len, ins_ids))
    n_fill = length - fixed
    if n_fill < 1:
        raise ValueError(f"length={length} is too short for this task: its fixed text alone takes {fixed} "
                         f"{'tokens' if tokenizer is not None else 'characters'}")
    fill_ids, fill_text = filler.take(n_fill)
    fill_units = fill_ids if tokenizer is not None else list(fill_text)
    cuts = sorted((min(max(d, 0.0), 1.0), k) for k, (d, _, _) in enumerate(insert))
    ids: List = [x for h in head_ids for x in h]
    text = "".join(head)
    spans = {}
    prev = 0
    for depth, k in cuts:
        at = int(round(depth * n_fill))
        seg = fill_units[prev:at]
        ids += seg
        text += decode(tokenizer, seg) if tokenizer is not None else "".join(seg)
        name = insert[k][1]
        spans[name] = (len(ids), len(ids) + len(ins_ids[k]))
        ids += ins_ids[k]
        text += insert[k][2]
        prev = at
    seg = fill_units[prev:]
    ids += seg
    text += decode(tokenizer, seg) if tokenizer is not None else "".join(seg)
    question_at = len(ids)
    for t, tid in zip(tail, tail_ids):
        ids += tid
        text += t
    meta = dict(meta, spans=spans, question_start=question_at, length=length,
                unit="tokens" if tokenizer is not None else "characters")
    if tokenizer is None:
        return Document(text, source, meta)
    assert len(ids) == length
    return Document(text, source, meta, tuple(int(i) for i in ids))


def _depths(depths, n: int, rng: random.Random) -> List[float]:
    if depths is None:
        return [rng.random() for _ in range(n)]
    ds = [depths] if isinstance(depths, (int, float)) else list(depths)
    for d in ds:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"depths must be numbers in [0, 1], got {d!r}")
    return ds


def passkey_task(n: int, length: int, *, tokenizer=None, seed: int = 0, depths=None, filler="docs") -> Dataset:
    """``n`` passkey-retrieval prompts of ``length`` tokens (characters without a tokenizer).

    A 5-digit key sits at a depth in the filler (``depths``: one number or a list cycled over the
    prompts; default seeded uniform); the prompt ends with the question, ``meta["answer"]`` holds the key.
    """
    _check_count("n", n)
    _check_count("length", length, 2)
    _check_seed(seed)
    rng = random.Random(seed)
    ds = _depths(depths, n, rng)
    fill = _Filler(filler, tokenizer, rng)
    docs = []
    for i in range(n):
        key = f"{rng.randrange(10000, 100000)}"
        depth = ds[i % len(ds)]
        needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
        docs.append(_build_task([("head", PASSKEY_INTRO), ("tail", "\n\nWhat is the pass key? The pass key is")],
                                [(depth, "passkey", needle)], length, tokenizer, fill,
                                f"passkey[{i}]", {"task": "passkey", "answer": key, "depth": depth, "seed": seed}))
    return Dataset("passkey", docs, f"passkey retrieval in {_filler_dataset(filler).name if isinstance(filler, Dataset) else filler} filler")


def needle_task(length: int, *, depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), per_depth: int = 1,
                tokenizer=None, seed: int = 0, filler="docs") -> Dataset:
    """Needle in a haystack: a sentence with a random number hidden at each depth of ``depths`` (``per_depth``
    prompts each); the prompt ends with the question and ``meta["answer"]`` holds the number."""
    _check_count("per_depth", per_depth)
    _check_seed(seed)
    rng = random.Random(seed)
    ds = _depths(depths, 1, rng)
    fill = _Filler(filler, tokenizer, rng)
    docs = []
    for depth in ds:
        for r in range(per_depth):
            word, number = rng.choice(NAMES), f"{rng.randrange(1000000, 10000000)}"
            needle = f"\nThe special magic {word} number is: {number}.\n"
            question = f"\n\nWhat is the special magic {word} number mentioned in the text above? " \
                       f"The special magic {word} number is:"
            docs.append(_build_task([("head", "Read the text below and answer the question at the end.\n\n"),
                                     ("tail", question)], [(depth, "needle", needle)], length, tokenizer, fill,
                                    f"needle[depth={depth:g}][{r}]",
                                    {"task": "needle", "answer": number, "depth": depth, "key": word, "seed": seed}))
    return Dataset("needle", docs, "needle in a haystack at depths " + ", ".join(f"{d:g}" for d in ds))


def multikey_task(n: int, length: int, *, keys: int = 4, tokenizer=None, seed: int = 0, filler="docs") -> Dataset:
    """``keys`` pass keys with different names spread over the filler; the question asks for one of them
    (seeded); ``meta["answer"]``, ``meta["asked"]`` and ``meta["keys"]`` say which and all of them."""
    _check_count("n", n)
    _check_count("keys", keys, 2)
    if keys > len(NAMES):
        raise ValueError(f"keys must be at most {len(NAMES)}, got {keys}")
    _check_seed(seed)
    rng = random.Random(seed)
    fill = _Filler(filler, tokenizer, rng)
    docs = []
    for i in range(n):
        names = rng.sample(NAMES, keys)
        values = {nm: f"{rng.randrange(10000, 100000)}" for nm in names}
        depths = sorted(rng.random() for _ in range(keys))
        asked = rng.choice(names)
        inserts = [(d, nm, f"\n\nThe pass key for {nm} is {values[nm]}.\n\n") for d, nm in zip(depths, names)]
        docs.append(_build_task([("head", PASSKEY_INTRO),
                                 ("tail", f"\n\nWhat is the pass key for {asked}? The pass key for {asked} is")],
                                inserts, length, tokenizer, fill, f"multikey[{i}]",
                                {"task": "multikey", "answer": values[asked], "asked": asked, "keys": values,
                                 "depths": dict(zip(names, depths)), "seed": seed}))
    return Dataset("multikey", docs, f"{keys}-key retrieval")


# --------------------------------------------------------------------------- registry
BUILTIN: Dict[str, Callable[[], Dataset]] = {"code": code_dataset, "docs": docs_dataset, "legal": legal_dataset}
SYNTHETIC: Dict[str, Callable[..., Dataset]] = {"passkey": passkey_task, "needle": needle_task,
                                                "multikey": multikey_task}


def available_datasets() -> List[str]:
    return list(BUILTIN) + list(SYNTHETIC)


def load_dataset(name_or_data, *, length: Optional[int] = None, tokenizer=None, n: int = 8, seed: int = 0,
                 text_field: str = "text", **kwargs) -> Dataset:
    """A built-in corpus (``code``, ``docs``, ``legal``), a synthetic task (``passkey``, ``needle``,
    ``multikey``: needs ``length``, and ``tokenizer`` for exact token lengths) or user data (a path or a
    list of strings, see :func:`load_user_data`)."""
    if isinstance(name_or_data, str) and name_or_data in BUILTIN:
        return BUILTIN[name_or_data](**kwargs)
    if isinstance(name_or_data, str) and name_or_data in SYNTHETIC:
        if length is None:
            raise ValueError(f"the synthetic task {name_or_data!r} needs length= (tokens of each prompt)")
        if name_or_data == "needle":
            return needle_task(length, tokenizer=tokenizer, seed=seed, **kwargs)
        return SYNTHETIC[name_or_data](n, length, tokenizer=tokenizer, seed=seed, **kwargs)
    if isinstance(name_or_data, str) and not os.path.exists(name_or_data) and os.sep not in name_or_data \
            and "." not in name_or_data:
        raise ValueError(f"unknown dataset {name_or_data!r}: use one of {available_datasets()} or a path to a "
                         f"file, folder or JSONL")
    return load_user_data(name_or_data, text_field=text_field, **kwargs)


__all__ = ["Document", "Dataset", "DataError", "Sample", "Span", "TokenizedSet", "code_dataset", "docs_dataset",
           "legal_dataset", "from_texts", "from_jsonl", "from_json", "from_folder", "load_user_data",
           "read_text_file", "to_token_length", "encode", "decode", "passkey_task", "needle_task",
           "multikey_task", "load_dataset", "available_datasets", "BUILTIN", "SYNTHETIC"]
