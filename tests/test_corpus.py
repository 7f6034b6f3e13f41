"""Corpora: stdlib discovery, the document split, local sources, tokenisation into sequences."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_transfer.corpus import (
    ROLE_CODE,
    CorpusConfig,
    Document,
    corpus_fingerprint,
    is_eval_document,
    iter_documents,
    split_documents,
    stdlib_files,
    stdlib_root,
    tokenize_sequences,
)
from sae_transfer.errors import UserError


class ByteTokenizer:
    """Exact, dependency-free tokenizer: id = byte + 2, BOS 0, EOS 1."""

    bos_token_id = 0
    eos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + 2 for b in text.encode()]

    def get_vocab(self) -> dict[str, int]:
        return {"<bos>": 0, "<eos>": 1, **{f"b{i}": i + 2 for i in range(256)}}


def _folder(tmp_path, n: int = 40, size: int = 50):
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(n):
        (root / f"doc{i:03d}.txt").write_text(f"document {i} " + "x" * size)
    return root


def test_stdlib_discovery_skips_tests_and_is_sorted():
    files = stdlib_files()
    root = stdlib_root()
    rel = [f.relative_to(root) for f in files]
    assert len(files) > 100
    assert files == sorted(files)
    assert any(r.as_posix() == "json/__init__.py" for r in rel)
    assert not any({"test", "tests", "__pycache__", "site-packages"} & set(r.parts[:-1]) for r in rel)
    docs = list(iter_documents(CorpusConfig(max_docs=3)))  # empty files (bare __init__.py) are skipped
    expected = [r.as_posix() for r, f in zip(rel, files) if f.read_text(errors="replace").strip()][:3]
    assert [d.doc_id for d in docs] == expected and all(d.text.strip() for d in docs)


def test_split_is_deterministic_independent_of_order_and_seeded():
    docs = [Document(f"pkg/mod{i}.py", f"text {i}") for i in range(400)]
    cfg = CorpusConfig(eval_fraction=0.2, seed=3)
    eval_ids = {d.doc_id for d in split_documents(docs, cfg, "eval")}
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert {d.doc_id for d in split_documents(shuffled, cfg, "eval")} == eval_ids
    train_ids = {d.doc_id for d in split_documents(docs, cfg, "train")}
    assert not eval_ids & train_ids and len(eval_ids | train_ids) == 400
    assert 40 <= len(eval_ids) <= 120  # ~20 %
    other_seed = {d.doc_id for d in split_documents(docs, CorpusConfig(eval_fraction=0.2, seed=4), "eval")}
    assert other_seed != eval_ids
    assert all(is_eval_document(d, cfg) for d in eval_ids)
    with pytest.raises(UserError, match="unknown split"):
        list(split_documents(docs, cfg, "validation"))


def test_local_folder_txt_jsonl_parquet_sources(tmp_path):
    root = _folder(tmp_path, n=3, size=1)
    (root / "skip.bin").write_bytes(b"\x00")
    folder_docs = list(iter_documents(CorpusConfig(source=str(root))))
    assert [d.doc_id for d in folder_docs] == ["doc000.txt", "doc001.txt", "doc002.txt"]
    texts = ["first doc\nline two", "second", "third"]
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(t.replace("\n", "\\n") for t in texts) + "\n\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)) + "\n")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": texts + [None]}), parquet)
    assert [d.text for d in iter_documents(CorpusConfig(source=str(txt)))] == texts
    assert [d.text for d in iter_documents(CorpusConfig(source=str(jsonl), text_column="body"))] == texts
    assert [d.text for d in iter_documents(CorpusConfig(source=str(parquet), text_column="body"))] == texts
    with pytest.raises(UserError, match="no column 'text'"):
        list(iter_documents(CorpusConfig(source=str(parquet))))
    with pytest.raises(UserError, match="no field 'text'"):
        list(iter_documents(CorpusConfig(source=str(jsonl))))
    with pytest.raises(UserError, match="does not exist"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "missing.jsonl"))))


def test_bad_jsonl_line_is_a_user_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        list(iter_documents(CorpusConfig(source=str(path))))


def test_row_split_follows_content_not_row_order(tmp_path):
    texts = [f"row text number {i}" for i in range(200)]
    forward, backward = tmp_path / "f.jsonl", tmp_path / "b.jsonl"
    forward.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    backward.write_text("\n".join(json.dumps({"text": t}) for t in reversed(texts)))

    def eval_texts(path):
        cfg = CorpusConfig(source=str(path), eval_fraction=0.3)
        return {d.text for d in split_documents(iter_documents(cfg), cfg, "eval")}

    held_out = eval_texts(forward)
    assert held_out == eval_texts(backward)
    assert 30 <= len(held_out) <= 90


def test_empty_or_too_small_corpus_is_a_user_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(UserError, match="gives only 0 train tokens"):
        tokenize_sequences(CorpusConfig(source=str(empty)), ByteTokenizer(), context_size=16)
    small = _folder(tmp_path, n=2, size=5)
    with pytest.raises(UserError, match="1000 requested"):
        tokenize_sequences(CorpusConfig(source=str(small), eval_fraction=0.0), ByteTokenizer(), context_size=16, n_tokens=1000)
    with pytest.raises(UserError, match="context_size"):
        tokenize_sequences(CorpusConfig(source=str(small)), ByteTokenizer(), context_size=1)


def test_sequences_start_with_bos_and_carry_roles(tmp_path):
    root = tmp_path / "two"
    root.mkdir()
    (root / "a.txt").write_text("abcdefg")
    (root / "b.txt").write_text("hijklmnopq")
    cfg = CorpusConfig(source=str(root), eval_fraction=0.0)
    seqs = tokenize_sequences(cfg, ByteTokenizer(), context_size=5)
    stream = ByteTokenizer().encode("abcdefg") + [1] + ByteTokenizer().encode("hijklmnopq") + [1]
    assert seqs.tokens_NS.shape == (len(stream) // 4, 5)
    assert seqs.tokens_NS[:, 0].tolist() == [0] * seqs.tokens_NS.shape[0]
    assert seqs.tokens_NS[:, 1:].flatten().tolist() == stream[: seqs.tokens_NS.shape[0] * 4]
    assert (seqs.roles_NS[:, 0] == ROLE_CODE["bos"]).all() and (seqs.roles_NS[:, 1:] == ROLE_CODE["text"]).all()
    no_bos = tokenize_sequences(cfg, ByteTokenizer(), context_size=5, prepend_bos=False)
    assert no_bos.tokens_NS.flatten().tolist() == stream[: no_bos.n_tokens]
    assert no_bos.fingerprint != seqs.fingerprint
    capped = tokenize_sequences(cfg, ByteTokenizer(), context_size=5, n_tokens=6)
    assert capped.tokens_NS.shape == (2, 5)  # rounded up to whole sequences


def test_fingerprints_change_with_content(tmp_path):
    root = _folder(tmp_path, n=3, size=40)
    cfg = CorpusConfig(source=str(root), eval_fraction=0.0)
    before = corpus_fingerprint(cfg)
    seq_before = tokenize_sequences(cfg, ByteTokenizer(), context_size=8).fingerprint
    assert corpus_fingerprint(cfg) == before
    (root / "doc001.txt").write_text("changed " + "y" * 40)
    assert corpus_fingerprint(cfg) != before
    assert tokenize_sequences(cfg, ByteTokenizer(), context_size=8).fingerprint != seq_before
    assert corpus_fingerprint(CorpusConfig(source=str(root), seed=1)) != corpus_fingerprint(CorpusConfig(source=str(root)))
