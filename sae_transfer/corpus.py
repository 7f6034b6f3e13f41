"""Corpora: the built-in stdlib corpus, local files, or a Hugging Face dataset, tokenised
into fixed-length sequences and split into train/eval by whole documents."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from sae_transfer.chat_pairs import ASSISTANT, END, USER, function_pairs
from sae_transfer.errors import UserError
from sae_transfer.storage.activations import ROLES  # role codes stored per token in the activation cache

log = logging.getLogger(__name__)

ROLE_CODE = {name: i for i, name in enumerate(ROLES)}

_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


@dataclass(frozen=True)
class CorpusConfig:
    """Where text comes from and how it is split."""

    source: str = "stdlib"  # "stdlib", a local .txt/.jsonl/.parquet file or folder, or a Hub dataset id
    text_column: str = "text"  # column holding the text in .jsonl/.parquet/Hub datasets
    hf_split: str = "train"  # split to stream from a Hub dataset
    hf_config: str | None = None  # Hub dataset config name, if it has several
    eval_fraction: float = 0.1  # share of whole documents held out for evaluation
    seed: int = 0  # decides which documents are held out
    max_docs: int | None = None  # stop reading after this many documents (Hub streams are unbounded)


@dataclass(frozen=True)
class Document:
    doc_id: str  # file path relative to the source root, or `row{i}` for rows of one file
    text: str
    split_key: str | None = None  # what decides the train/eval split; None: the doc_id

    @property
    def key(self) -> str:
        """The string the deterministic split hashes."""
        return self.doc_id if self.split_key is None else self.split_key


def _row(i: int, text: str) -> Document:
    # Rows are split by content, so reordering or inserting rows moves no row across the
    # split, and duplicate rows always land on the same side.
    return Document(f"row{i}", text, hashlib.sha256(text.encode()).hexdigest())


@dataclass
class TokenSequences:
    """Fixed-length token sequences with per-token roles (ROLES codes)."""

    tokens_NS: torch.Tensor  # int64 token ids
    roles_NS: torch.Tensor  # uint8 role codes
    fingerprint: str  # hash of corpus identity, split, tokenizer and chunking

    @property
    def n_tokens(self) -> int:
        return self.tokens_NS.numel()


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library `.py` files (no tests), sorted by path."""
    return list(_stdlib_files(stdlib_root()))


@functools.lru_cache(maxsize=4)
def _stdlib_files(root: Path) -> tuple[Path, ...]:
    # Walking the stdlib takes ~1 s; it does not change while the interpreter runs.
    files = [
        p for p in root.rglob("*.py")
        if not _STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1])
    ]
    return tuple(sorted(files))


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def iter_documents(cfg: CorpusConfig) -> Iterator[Document]:
    """Yield documents in a deterministic order from the configured source."""
    count = 0
    for doc in _iter_source(cfg):
        if not doc.text.strip():
            continue
        yield doc
        count += 1
        if cfg.max_docs is not None and count >= cfg.max_docs:
            return


def _iter_source(cfg: CorpusConfig) -> Iterator[Document]:
    if cfg.source in ("stdlib", "demo-mixed"):
        root = stdlib_root()
        for path in stdlib_files():
            doc = Document(str(path.relative_to(root)), _read_text(path))
            yield doc
            if cfg.source == "demo-mixed":
                yield from _chat_documents(doc)
        return
    path = Path(cfg.source).expanduser()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".py", ".md"}):
            yield Document(str(file.relative_to(path)), _read_text(file))
    elif path.suffix == ".txt" and path.is_file():
        # One document per line; a literal backslash-n inside a line stands for a newline.
        for i, line in enumerate(_read_text(path).splitlines()):
            yield _row(i, line.replace("\\n", "\n"))
    elif path.suffix == ".jsonl" and path.is_file():
        yield from _iter_jsonl(path, cfg.text_column)
    elif path.suffix == ".parquet" and path.is_file():
        yield from _iter_parquet(path, cfg.text_column)
    elif cfg.source.startswith((".", "/", "~")) or path.suffix in {".txt", ".jsonl", ".parquet"}:
        raise UserError(f"corpus file {cfg.source!r} does not exist: pass an existing .txt/.jsonl/.parquet path, "
                        "a folder, 'stdlib' or a Hub dataset id")
    else:
        yield from _iter_hub(cfg)


def _chat_documents(doc: Document) -> Iterator[Document]:
    """The demo chat format of a stdlib file's (docstring -> function) pairs, one document per
    pair: `<|user|>prompt<|end|><|assistant|>answer<|end|>`, as the demo chat model saw them in
    fine-tuning. "demo-mixed" interleaves them with the plain files (as model-diffing work mixes
    web text and chat data), so role and template tokens reach the activation caches."""
    for i, pair in enumerate(function_pairs(doc.doc_id, doc.text)):
        yield Document(f"{doc.doc_id}#chat{i}", f"{USER}{pair.prompt}{END}{ASSISTANT}{pair.response}{END}")


def _iter_jsonl(path: Path, column: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {i + 1} is not valid JSON ({exc.msg}): fix or remove that line") from exc
            yield _row(i, _column(row, column, path))


def _iter_parquet(path: Path, column: str) -> Iterator[Document]:
    file = pq.ParquetFile(path)
    if column not in file.schema_arrow.names:
        raise UserError(f"{path} has no column {column!r}; pass --text-column one of {file.schema_arrow.names}")
    i = 0
    for batch in file.iter_batches(columns=[column], batch_size=1024):  # streamed, not loaded whole
        for text in batch.column(0).to_pylist():
            yield _row(i, text or "")
            i += 1


def _column(row: dict, column: str, where: object) -> str:
    if not isinstance(row, dict):
        raise UserError(f"{where} holds a JSON {type(row).__name__} where an object with field {column!r} was expected")
    if column not in row:
        raise UserError(f"{where} has no field {column!r}; pass --text-column one of {sorted(row)}")
    return row[column] or ""


def _iter_hub(cfg: CorpusConfig) -> Iterator[Document]:
    """Stream a Hugging Face dataset (downloads: only when the user named one)."""
    import datasets  # deferred: seconds to import, only for Hub datasets

    try:
        stream = datasets.load_dataset(cfg.source, cfg.hf_config, split=cfg.hf_split, streaming=True)
    except Exception as exc:  # the Hub raises many types; the user needs one line
        raise UserError(f"could not open dataset {cfg.source!r}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    for i, row in enumerate(stream):
        yield _row(i, _column(row, cfg.text_column, cfg.source))


def is_eval_document(key: str, cfg: CorpusConfig) -> bool:
    """Deterministic split by document: depends only on its key (`Document.key`: the path of a
    file, the content of a row) and the seed, not on the order documents come in."""
    digest = hashlib.sha256(f"{cfg.seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < cfg.eval_fraction


def split_documents(docs: Iterable[Document], cfg: CorpusConfig, split: str) -> Iterator[Document]:
    """The documents of `split` ('train' or 'eval')."""
    if split not in {"train", "eval"}:
        raise UserError(f"unknown split {split!r}: use 'train' or 'eval'")
    want_eval = split == "eval"
    return (d for d in docs if is_eval_document(d.key, cfg) == want_eval)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of a tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([vocab, tokenizer.bos_token_id, tokenizer.eos_token_id])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def corpus_fingerprint(cfg: CorpusConfig) -> str:
    """Hash of what the corpus is: for local files their content, for stdlib the file list."""
    digest = hashlib.sha256(json.dumps(cfg.__dict__, sort_keys=True).encode())
    if cfg.source == "stdlib":
        root = stdlib_root()
        for path in stdlib_files():
            digest.update(f"{path.relative_to(root)}:{path.stat().st_size}".encode())
    else:
        path = Path(cfg.source).expanduser()
        files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
        for file in files:
            if file.is_file():
                digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
                digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def iter_sequence_bodies(cfg: CorpusConfig, tokenizer, *, context_size: int, split: str = "train",
                         prepend_bos: bool = True) -> Iterator[list[int]]:
    """The split's documents, concatenated with the EOS token between them and cut into chunks of
    `context_size` token ids (minus one when a BOS is to be prepended), in corpus order, one
    chunk at a time: memory stays one document plus one chunk whatever the corpus size."""
    if context_size < 2:
        raise UserError(f"context_size must be at least 2, got {context_size}")
    if prepend_bos and tokenizer.bos_token_id is None:
        raise UserError("tokenizer has no BOS token: pass --no-prepend-bos or use a tokenizer with one")
    sep = tokenizer.eos_token_id
    body = context_size - 1 if prepend_bos else context_size
    stream: list[int] = []
    for doc in split_documents(iter_documents(cfg), cfg, split):
        stream.extend(tokenizer.encode(doc.text, add_special_tokens=False))
        if sep is not None:
            stream.append(sep)
        start = 0
        while len(stream) - start >= body:
            yield stream[start:start + body]
            start += body
        del stream[:start]


def too_small(cfg: CorpusConfig, have_seqs: int, context_size: int, split: str, n_tokens: int | None) -> UserError:
    need = "" if n_tokens is None else f"; {n_tokens} requested"
    return UserError(
        f"corpus {cfg.source!r} gives only {have_seqs * context_size} {split} tokens at context size {context_size}{need}: "
        "lower the token count or context size, or use a larger corpus"
    )


def sequences_fingerprint(cfg: CorpusConfig, tokenizer, split: str, context_size: int, prepend_bos: bool,
                          n_seqs: int) -> str:
    """The identity of `n_seqs` sequences of the split as `tokenize_sequences` cuts them."""
    payload = f"{corpus_fingerprint(cfg)}:{split}:{tokenizer_fingerprint(tokenizer)}:{context_size}:{prepend_bos}:{n_seqs}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tokenize_sequences(
    cfg: CorpusConfig,
    tokenizer,
    *,
    context_size: int,
    n_tokens: int | None = None,
    split: str = "train",
    prepend_bos: bool = True,
) -> TokenSequences:
    """Tokenise the split's documents into [N, context_size] sequences in memory
    (`iter_sequence_bodies`; `sae_transfer.token_file` writes them to disk instead). Stops once
    `n_tokens` tokens are collected (rounded up to whole sequences); raises UserError if the
    corpus is smaller."""
    bos = tokenizer.bos_token_id
    n_seqs_wanted = None if n_tokens is None else -(-n_tokens // context_size)
    chunks: list[list[int]] = []
    for chunk in iter_sequence_bodies(cfg, tokenizer, context_size=context_size, split=split, prepend_bos=prepend_bos):
        chunks.append(chunk)
        if n_seqs_wanted is not None and len(chunks) >= n_seqs_wanted:
            break
    if not chunks or (n_seqs_wanted is not None and len(chunks) < n_seqs_wanted):
        raise too_small(cfg, len(chunks), context_size, split, n_tokens)
    tokens = torch.tensor(chunks, dtype=torch.int64)
    roles = torch.full_like(tokens, ROLE_CODE["text"], dtype=torch.uint8)
    if prepend_bos:
        tokens = torch.cat([torch.full((len(chunks), 1), bos, dtype=torch.int64), tokens], dim=1)
        roles = torch.cat([torch.full((len(chunks), 1), ROLE_CODE["bos"], dtype=torch.uint8), roles], dim=1)
    return TokenSequences(tokens, roles,
                          sequences_fingerprint(cfg, tokenizer, split, context_size, prepend_bos, tokens.shape[0]))
