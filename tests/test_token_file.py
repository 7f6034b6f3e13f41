"""Training sequences on disk (sae_transfer.token_file): the rows and fingerprint
`tokenize_sequences` gives, written once, read by row, never half-written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_transfer import token_file as tf
from sae_transfer.corpus import CorpusConfig, tokenize_sequences
from sae_transfer.errors import UserError
from tests._tiny import build_tokenizer, tiny_corpus_dir


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return CorpusConfig(source=str(tiny_corpus_dir(root, n_copies=1))), build_tokenizer()


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_token_file_holds_the_in_memory_sequences(corpus_and_tokenizer, tmp_path, monkeypatch, prepend_bos):
    corpus, tok = corpus_and_tokenizer
    monkeypatch.setattr(tf, "BLOCK_SEQUENCES", 7)  # several blocks, the last one short
    seqs = tokenize_sequences(corpus, tok, context_size=32, n_tokens=3000, prepend_bos=prepend_bos)
    file = tf.token_file(corpus, tok, context_size=32, n_tokens=3000, prepend_bos=prepend_bos, root=tmp_path)
    assert file.shape == tuple(seqs.tokens_NS.shape) and file.fingerprint == seqs.fingerprint
    idx = torch.randperm(file.n_seqs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(file.rows(idx), seqs.tokens_NS[idx])
    with pytest.raises(IndexError):
        file.rows([file.n_seqs])


def test_token_file_is_written_once_and_a_partial_write_is_ignored(corpus_and_tokenizer, tmp_path, monkeypatch):
    corpus, tok = corpus_and_tokenizer
    (tmp_path / "leftover.123.tmp").write_bytes(b"\0" * 10)  # a killed writer's file: never read
    first = tf.token_file(corpus, tok, context_size=32, n_tokens=2048, root=tmp_path)
    calls = []
    monkeypatch.setattr(tf, "iter_sequence_bodies", lambda *a, **k: calls.append(1) or iter(()))
    again = tf.token_file(corpus, tok, context_size=32, n_tokens=2048, root=tmp_path)
    assert again == first and not calls
    data = np.fromfile(first.path, dtype=np.int32)
    assert data.size == first.n_seqs * 32  # the sidecar is written after the whole file


def test_a_corpus_smaller_than_asked_gives_all_it_has_and_an_empty_one_is_an_error(corpus_and_tokenizer, tmp_path):
    corpus, tok = corpus_and_tokenizer
    everything = tf.token_file(corpus, tok, context_size=32, root=tmp_path)
    more = tf.token_file(corpus, tok, context_size=32, n_tokens=everything.n_tokens * 10, root=tmp_path)
    assert more.n_seqs == everything.n_seqs
    with pytest.raises(UserError, match="gives only 0"):
        tf.token_file(corpus, tok, context_size=10**7, root=tmp_path)
