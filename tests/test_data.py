"""nsa_viz.data: datasets built from made-up files in a temporary folder, tokenisation to a length, tasks."""
from __future__ import annotations

import json
import os

import pytest
import torch

from nsa_viz import data as D


def write(path, content, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(content)
    return str(path)


# --------------------------------------------------------------------------- corpora
def test_code_dataset_reads_modules_skips_tests_and_broken_files(tmp_path):
    root = tmp_path / "lib"
    a = write(root / "alpha.py", "def f(x):\n    return x + 1\n")
    b = write(root / "pkg" / "beta.py", "import alpha\nclass B: pass\n")
    write(root / "test" / "test_alpha.py", "assert True\n")  # test packages are not library code
    write(root / ".hidden.py", "x = 1\n")
    write(root / "notes.txt", "not python\n")
    bad = write(root / "latin.py", "s = 'caf\xe9'\n".encode("latin-1"), mode="wb")
    ds = D.code_dataset(root)
    assert [d.source for d in ds] == sorted([a, b]) or {d.source for d in ds} == {a, b}
    assert ds.name == "code" and len(ds) == 2
    assert ds[0].text == open(ds[0].source).read()
    assert [s for s, _ in ds.skipped] == [bad] and "utf-8" in ds.skipped[0][1]
    with pytest.raises(D.DataError, match="latin.py"):
        D.code_dataset(root, on_error="raise")
    with pytest.raises(D.DataError, match="does not exist"):
        D.code_dataset(tmp_path / "missing")


def test_docs_dataset_one_document_per_topic():
    ds = D.docs_dataset({"b-topic": "Second text.", "a-topic": "First text.", "empty": "  "})
    assert [d.source for d in ds] == ["pydoc_data.topics:a-topic", "pydoc_data.topics:b-topic"]
    real = D.docs_dataset()
    assert len(real) > 50 and sum(len(d.text) for d in real) > 100_000
    assert all(d.source.startswith("pydoc_data.topics:") for d in real)


def test_legal_dataset_folder_symlinks_and_package_fallback(tmp_path):
    lic = tmp_path / "licenses"
    gpl = write(lic / "GPL-3", "GNU GENERAL PUBLIC LICENSE\nVersion 3\n")
    write(lic / "MIT", "Permission is hereby granted, free of charge\n")
    os.symlink(gpl, lic / "GPL")
    ds = D.legal_dataset(lic)
    assert sorted(os.path.basename(d.source) for d in ds) == ["GPL-3", "MIT"]
    assert ds.skipped == [(str(lic / "GPL"), f"same file as {gpl}")]

    site = tmp_path / "site"
    write(site / "foo-1.0.dist-info" / "LICENSE", "MIT License\nCopyright foo\n")
    write(site / "bar-2.0.dist-info" / "licenses" / "LICENSE.txt", "Apache License 2.0\n")
    write(site / "baz-1.0.dist-info" / "COPYING", "MIT License\nCopyright foo\n")  # same text as foo's
    write(site / "foo" / "LICENSE", "inside the package, not its metadata\n")
    fb = D.legal_dataset(tmp_path / "no-such-dir", package_dirs=[str(site)])
    assert len(fb) == 2 and {d.text for d in fb} == {"MIT License\nCopyright foo\n", "Apache License 2.0\n"}
    assert "installed Python packages" in fb.description
    with pytest.raises(D.DataError, match="no license texts"):
        D.legal_dataset(tmp_path / "no-such-dir", package_dirs=[str(tmp_path / "empty")])


def test_sampling_is_seeded_and_prefix_stable():
    ds = D.from_texts([f"text number {i}" for i in range(40)])
    a, b = ds.sample(10, seed=3), ds.sample(10, seed=3)
    assert [d.source for d in a] == [d.source for d in b]
    assert [d.source for d in ds.sample(20, seed=3)][:10] == [d.source for d in a]
    assert [d.source for d in ds.sample(10, seed=4)] != [d.source for d in a]
    assert ds.fingerprint() == D.from_texts([f"text number {i}" for i in range(40)]).fingerprint()
    assert ds.fingerprint() != D.from_texts([f"text number {i}" for i in range(39)] + ["x"]).fingerprint()
    with pytest.raises(ValueError, match="seed"):
        ds.sample(3, seed="0")
    m = ds.sample(2, seed=0).manifest()
    assert m["n_documents"] == 2 and set(m["documents"][0]) == {"source", "chars", "sha256"}


# --------------------------------------------------------------------------- user data and its errors
def test_user_data_kinds(tmp_path):
    f = write(tmp_path / "one.txt", "A single document.\n")
    assert [d.source for d in D.load_user_data(f)] == [f]
    folder = tmp_path / "folder"
    write(folder / "a.md", "alpha")
    write(folder / "sub" / "b.txt", "beta")
    assert [d.text for d in D.load_user_data(str(folder))] == ["alpha", "beta"]
    assert [d.text for d in D.from_folder(folder, suffixes=(".md",))] == ["alpha"]
    jl = write(tmp_path / "d.jsonl", '{"text": "first", "id": 1}\n\n{"text": "second"}\n')
    got = D.load_user_data(jl)
    assert [d.text for d in got] == ["first", "second"] and got[1].source == f"{jl}:3"
    body = write(tmp_path / "b.jsonl", '{"body": "x"}\n')
    assert D.load_user_data(body, text_field="body")[0].text == "x"
    js = write(tmp_path / "d.json", json.dumps(["p", {"text": "q"}]))
    assert [d.text for d in D.load_user_data(js)] == ["p", "q"]
    lst = D.load_user_data(["one", "two"])
    assert [d.source for d in lst] == ["texts[0]", "texts[1]"]


@pytest.mark.parametrize("kind, match", [("binary", "binary"), ("empty", "empty"), ("encoding", "utf-8"),
                                         ("missing", "no such file"), ("field", "no field 'text'"),
                                         ("json", "not valid JSON"), ("type", "must be a string")])
def test_bad_files_name_the_file(tmp_path, kind, match):
    name = {"field": "x.jsonl", "json": "x.jsonl", "type": "x.jsonl"}.get(kind, "bad.txt")
    path = str(tmp_path / name)
    if kind == "binary":
        write(path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", mode="wb")
    elif kind == "empty":
        write(path, "")
    elif kind == "encoding":
        write(path, "na\xefve caf\xe9".encode("latin-1"), mode="wb")
    elif kind == "field":
        write(path, '{"text": "ok"}\n{"content": "no text field"}\n')
    elif kind == "json":
        write(path, '{"text": "ok"}\n{"text": broken\n')
    elif kind == "type":
        write(path, '{"text": 42}\n')
    with pytest.raises(D.DataError, match=match) as err:
        D.load_user_data(path)
    assert path in str(err.value)
    if kind in ("field", "json"):
        assert f"{path}:2" in str(err.value)


def test_folder_with_a_bad_file(tmp_path):
    folder = tmp_path / "mixed"
    write(folder / "good.txt", "fine text")
    bad = write(folder / "image.bin", b"\x00\x01\x02", mode="wb")
    with pytest.raises(D.DataError, match="image.bin.*binary.*on_error='skip'"):
        D.from_folder(folder)
    ds = D.from_folder(folder, on_error="skip")
    assert [d.text for d in ds] == ["fine text"] and ds.skipped[0][0] == bad


def test_list_errors():
    with pytest.raises(D.DataError, match=r"texts\[1\] is empty"):
        D.from_texts(["ok", " "])
    with pytest.raises(D.DataError, match=r"texts\[0\] must be a string"):
        D.from_texts([b"bytes"])
    with pytest.raises(TypeError, match="list of strings"):
        D.from_texts("one string")
    with pytest.raises(ValueError, match="unknown dataset 'cod'"):
        D.load_dataset("cod")


# --------------------------------------------------------------------------- cutting and packing
def test_cut_windows_are_exact_and_short_documents_reported(char_tokenizer):
    ds = D.from_texts(["a" * 25, "b" * 9, "c" * 10, "d" * 31])
    ts = ds.tokenize(char_tokenizer, 10, mode="cut", seed=0)
    assert all(s.ids.shape == (10,) for s in ts)
    # one window per long document first, then second windows: 25 -> 2, 10 -> 1, 31 -> 3 windows
    assert len(ts) == 6 and sorted(ts.short) == [("texts[1]", 9, "skipped")]
    for s in ts:
        (span,) = s.spans
        doc = ds[int(span.source[6:-1])]
        assert s.ids.tolist() == [ord(c) for c in doc.text[span.start:span.end]]
    firsts = [s.spans[0].start for s in ts]
    assert firsts[:3] == [0, 0, 0] and sorted(firsts[3:]) == [10, 10, 20]
    two = ds.tokenize(char_tokenizer, 10, n=2, mode="cut", seed=0)
    assert [s.digest() for s in two] == [s.digest() for s in ts][:2]
    with pytest.warns(UserWarning, match="9 asked for"):
        ds.tokenize(char_tokenizer, 10, n=9, mode="cut")
    with pytest.raises(D.DataError, match="try mode=pack"):
        D.from_texts(["short"]).tokenize(char_tokenizer, 10, mode="cut")
    with pytest.raises(ValueError, match="mode must be one of"):
        ds.tokenize(char_tokenizer, 10, mode="pad")


def test_pack_and_auto(char_tokenizer):
    ds = D.from_texts(["aaaa", "bbbbbb", "cccccccccccc", "dd"])
    ts = ds.tokenize(char_tokenizer, 8, mode="pack", seed=0)
    stream = []
    order = ds.order(0)
    for k, i in enumerate(order):
        stream += ([] if k == 0 else [ord("\n")] * 2) + [ord(c) for c in ds[i].text]
    assert torch.equal(ts.ids.flatten(), torch.tensor(stream[: len(ts) * 8]))
    for s in ts:  # every span points at the document's own tokens
        for sp in s.spans:
            doc = ds[int(sp.source[6:-1])]
            got = s.ids[sp.offset: sp.offset + sp.end - sp.start].tolist()
            assert got == [ord(c) for c in doc.text[sp.start:sp.end]]
    assert ts.short and ts.short[-1][2] == "skipped: packed remainder"
    auto = ds.tokenize(char_tokenizer, 8, mode="auto", seed=0)
    kinds = {s for _, _, s in auto.short}
    assert kinds == {"packed"} and {x[0] for x in auto.short} == {"texts[0]", "texts[1]", "texts[3]"}
    assert auto.samples[0].spans[0].source == "texts[2]" and len(auto.samples[0].spans) == 1
    assert any(s.meta.get("packed") for s in auto)
    assert "shorter than 8 tokens (3 packed" in auto.report()
    one = ds.tokenize(char_tokenizer, 8, n=1, mode="auto", seed=0)  # the long document suffices
    assert {s for _, _, s in one.short} <= {"not used (enough longer documents)"}


def test_tokenize_with_real_corpus(char_tokenizer):
    ts = D.docs_dataset().tokenize(char_tokenizer, 512, n=5, seed=1)
    assert ts.ids.shape == (5, 512)
    assert all(s.source.startswith("pydoc_data.topics:") for s in ts)


# --------------------------------------------------------------------------- synthetic tasks
def test_passkey_exact_length_and_key_position(char_tokenizer):
    ds = D.passkey_task(3, 600, tokenizer=char_tokenizer, seed=7, depths=[0.0, 0.5, 1.0])
    again = D.passkey_task(3, 600, tokenizer=char_tokenizer, seed=7, depths=[0.0, 0.5, 1.0])
    assert [d.meta["answer"] for d in ds] == [d.meta["answer"] for d in again]
    for d in ds:
        assert len(d.token_ids) == 600
        a, b = d.meta["spans"]["passkey"]
        needle = "".join(chr(i) for i in d.token_ids[a:b])
        assert f"The pass key is {d.meta['answer']}." in needle
        assert d.text.endswith("The pass key is") and d.meta["answer"] not in d.text[d.text.index("What is"):]
    starts = [d.meta["spans"]["passkey"][0] for d in ds]
    assert starts[0] < starts[1] < starts[2]
    ts = ds.tokenize(char_tokenizer, 600)
    assert len(ts) == 3 and torch.equal(ts.samples[0].ids, torch.tensor(ds[ds.order(0)[0]].token_ids))
    with pytest.raises(ValueError, match="too short"):
        D.passkey_task(1, 50, tokenizer=char_tokenizer)


def test_needle_and_multikey(char_tokenizer):
    ds = D.needle_task(400, depths=(0.1, 0.9), per_depth=2, tokenizer=char_tokenizer, seed=0, filler="legal")
    assert len(ds) == 4 and [d.meta["depth"] for d in ds] == [0.1, 0.1, 0.9, 0.9]
    for d in ds:
        a, b = d.meta["spans"]["needle"]
        assert d.meta["answer"] in "".join(chr(i) for i in d.token_ids[a:b])
    mk = D.multikey_task(2, 700, keys=3, tokenizer=char_tokenizer, seed=1, filler="code")
    for d in mk:
        assert len(d.token_ids) == 700 and len(d.meta["keys"]) == 3
        assert d.meta["answer"] == d.meta["keys"][d.meta["asked"]]
        a, b = d.meta["spans"][d.meta["asked"]]
        assert d.meta["answer"] in "".join(chr(i) for i in d.token_ids[a:b])
    chars = D.passkey_task(2, 300, seed=0)  # no tokenizer: lengths in characters
    assert all(len(d.text) == 300 and d.token_ids is None for d in chars)
    with pytest.raises(ValueError, match="depths must be numbers in"):
        D.needle_task(400, depths=(1.5,), tokenizer=char_tokenizer)
