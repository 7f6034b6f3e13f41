"""Tokenised training sequences on disk, read by row: what a live source runs the model on.

Holding a study's training tokens in memory does not scale: `tokenize_sequences` keeps Python
lists before building its tensor (tens of bytes a token; 800M tokens would need tens of GB), and
even an int64 tensor is 6.4 GB. A `TokenFile` is the same [N, context_size] sequences
(`tokenize_sequences` cuts them identically and they carry the same fingerprint) written once,
block by block, as int32 rows to `<cache>/tokens/<key>.i32` with a JSON sidecar written last;
`rows(idx)` reads the rows a chunk needs and maps nothing between calls, so the host memory of a
live run does not grow with its token budget. The key covers the corpus, the split, the
tokenizer, the context, the BOS setting and the tokens asked for; a second run reuses the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_transfer.corpus import (
    CorpusConfig,
    corpus_fingerprint,
    iter_sequence_bodies,
    sequences_fingerprint,
    tokenizer_fingerprint,
    too_small,
)

BLOCK_SEQUENCES = 4096  # sequences tokenised per write


def cache_root() -> Path:
    """Where derived files that are not results live: $SAE_TRANSFER_CACHE_DIR or ~/.cache/sae-transfer."""
    return Path(os.environ.get("SAE_TRANSFER_CACHE_DIR") or Path.home() / ".cache" / "sae-transfer")


@dataclass(frozen=True)
class TokenFile:
    """[n_seqs, context_size] int32 token ids in a file; `rows` reads any of them."""

    path: Path
    n_seqs: int
    context_size: int
    fingerprint: str  # the fingerprint `tokenize_sequences` gives the same sequences

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_seqs, self.context_size

    @property
    def n_tokens(self) -> int:
        return self.n_seqs * self.context_size

    def rows(self, idx: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        """Sequences `idx` (in that order) as int64 [len(idx), context_size]."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_seqs):
            raise IndexError(f"sequence index out of range 0..{self.n_seqs - 1}")
        mapped = np.memmap(self.path, dtype=np.int32, mode="r", shape=(self.n_seqs, self.context_size))
        try:
            return torch.from_numpy(mapped[idx].astype(np.int64))
        finally:
            del mapped  # unmapped: pages read stay in the page cache, not in this process

    def head(self, n_seqs: int, fingerprint: str) -> TokenFile:
        """The first `n_seqs` sequences (the same file), whose fingerprint is `fingerprint`
        (`corpus.sequences_fingerprint` of that many)."""
        return TokenFile(self.path, min(n_seqs, self.n_seqs), self.context_size, fingerprint)


def token_file(cfg: CorpusConfig, tokenizer, *, context_size: int, n_tokens: int | None = None, split: str = "train",
               prepend_bos: bool = True, root: Path | None = None) -> TokenFile:
    """The split's sequences as `tokenize_sequences` cuts them (its first `n_tokens` tokens, whole
    sequences; all of a smaller corpus), written once under `root` (default: `cache_root()/tokens`)
    and reused. Raises UserError for a corpus with no whole sequence."""
    root = Path(root) if root is not None else cache_root() / "tokens"
    key = hashlib.sha256(json.dumps([corpus_fingerprint(cfg), split, tokenizer_fingerprint(tokenizer), context_size,
                                     prepend_bos, n_tokens]).encode()).hexdigest()[:20]
    path, sidecar = root / f"{key}.i32", root / f"{key}.json"
    if sidecar.is_file() and path.is_file():
        meta = json.loads(sidecar.read_text())
        return TokenFile(path, meta["n_seqs"], context_size, meta["fingerprint"])
    root.mkdir(parents=True, exist_ok=True)
    wanted = None if n_tokens is None else -(-n_tokens // context_size)
    bos = tokenizer.bos_token_id
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    n, block = 0, []
    with open(tmp, "wb") as out:
        def flush():
            rows = np.asarray(block, dtype=np.int32)
            if prepend_bos:
                rows = np.concatenate([np.full((len(block), 1), bos, dtype=np.int32), rows], axis=1)
            out.write(rows.tobytes())
            block.clear()

        for body in iter_sequence_bodies(cfg, tokenizer, context_size=context_size, split=split, prepend_bos=prepend_bos):
            block.append(body)
            n += 1
            if len(block) == BLOCK_SEQUENCES:
                flush()
            if wanted is not None and n >= wanted:
                break
        if block:
            flush()
    if n == 0:
        tmp.unlink(missing_ok=True)
        raise too_small(cfg, 0, context_size, split, n_tokens)
    os.replace(tmp, path)
    fingerprint = sequences_fingerprint(cfg, tokenizer, split, context_size, prepend_bos, n)
    tmp_meta = sidecar.with_suffix(f".{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps({"n_seqs": n, "context_size": context_size, "fingerprint": fingerprint,
                                    "corpus": cfg.source, "split": split}))
    os.replace(tmp_meta, sidecar)  # last: a reader never takes a half-written file
    return TokenFile(path, n, context_size, fingerprint)
