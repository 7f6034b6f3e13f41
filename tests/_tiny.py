"""A tiny local Llama checkpoint + BPE tokenizer for tests (builds in about a second).

Other test modules import `tiny_model_dir` to get a Hugging Face folder that
`sae_transfer.models.load_model` boots offline.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def _training_text() -> list[str]:
    """A few stdlib sources: enough text for a byte-level BPE of a few hundred merges."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["abc.py", "bisect.py", "colorsys.py", "keyword.py", "this.py", "heapq.py"]
    return [(root / n).read_text(encoding="utf-8") for n in names if (root / n).is_file()]


def build_tokenizer(vocab: int = 384):
    """A byte-level BPE `PreTrainedTokenizerFast` with <bos>/<eos> and `vocab` entries at most."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_model_dir(
    tmp_path: Path,
    d_model: int = 32,
    n_layers: int = 2,
    vocab: int = 384,
    seed: int = 0,
    name: str = "tiny-llama",
) -> Path:
    """Save a random-weight Llama (fixed seed) and its tokenizer under `tmp_path/name`; return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(tmp_path) / name
    if (out / "config.json").is_file():
        return out
    tokenizer = build_tokenizer(vocab)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_synthetic_dataset(
    path: Path,
    n_rows: int,
    d_model: int = 16,
    dtype: str = "float32",
    seq_len: int = 32,
    shard_bytes: int = 1 << 20,
    row_group_rows: int | None = 256,
    nan_row: int | None = None,
) -> Path:
    """Write an activation dataset whose row r has act[0] = r (exact in every dtype up to 256
    for bf16, so bf16 datasets should stay small), act[1:] random; roles: bos at pos 0, else
    text/user alternating by sequence; `norm` is the norm of act[1:] (so row ids do not
    dominate it). `nan_row` plants a NaN. Returns the folder."""
    import numpy as np
    import torch

    from sae_transfer.storage.activations import ELEMENT_DTYPES
    from sae_transfer.storage.activations_write import ActivationWriter, WriterConfig

    meta = {"model_id": "synthetic", "hook": "blocks.0.hook_resid_pre", "d_model": d_model,
            "dtype": dtype, "n_tokens": n_rows, "context_size": seq_len}
    writer = ActivationWriter(path, meta, WriterConfig(shard_bytes=shard_bytes, row_group_rows=row_group_rows))
    gen = torch.Generator().manual_seed(0)
    step = seq_len * 64
    for r0 in range(0, n_rows, step):
        rows = torch.arange(r0, min(n_rows, r0 + step))
        acts = torch.randn(len(rows), d_model, generator=gen)
        acts[:, 0] = rows.float()
        if nan_row is not None and r0 <= nan_row < r0 + len(rows):
            acts[nan_row - r0, 1] = float("nan")
        seq = (rows // seq_len).numpy()
        pos = (rows % seq_len).numpy().astype(np.int32)
        role = np.where(pos == 0, 0, np.where(seq % 2 == 0, 1, 2)).astype(np.uint8)
        stored = acts.to(ELEMENT_DTYPES[dtype][0])
        raw = stored.view(torch.int16) if dtype == "bfloat16" else stored
        writer.append(seq, pos, rows.numpy().astype(np.int32) % 1000, role,
                      torch.linalg.vector_norm(acts[:, 1:], dim=1).numpy(), raw.numpy().view(np.uint8))
    writer.finish()
    return Path(path)


def tiny_corpus_dir(tmp_path: Path, n_copies: int = 4) -> Path:
    """A folder of a few stdlib sources (about 60k tokens with the tiny tokenizer), usable as
    `CorpusConfig(source=str(folder))`; much faster to fingerprint than the whole stdlib."""
    out = Path(tmp_path) / "corpus"
    if out.is_dir():
        return out
    out.mkdir(parents=True)
    for copy in range(n_copies):
        for i, text in enumerate(_training_text()):
            (out / f"doc{copy}_{i}.py").write_text(text, encoding="utf-8")
    return out


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `sae-transfer ARGS` in this process: (exit code, stdout, stderr)."""
    import sys

    from sae_transfer.cli import main

    monkeypatch.setattr(sys, "argv", ["sae-transfer", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
