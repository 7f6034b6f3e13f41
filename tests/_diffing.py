"""Helpers for the diffing tests: small activation caches written with the real cache writer,
and hand-set SAEs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write_acts_cache(path: Path, acts_ND: torch.Tensor, seq_len: int = 16, model_id: str = "tiny-base",
                     hook: str = "blocks.1.hook_resid_pre", token_ids_N: torch.Tensor | None = None,
                     roles_N: torch.Tensor | None = None, row_group_rows: int = 96) -> Path:
    """A float32 activation dataset holding `acts_ND` in order: row r is (seq r // seq_len, pos
    r % seq_len); token ids default to (7r mod 97), roles to "bos" at pos 0 and "text" elsewhere.
    Small row groups and shards, so sequences straddle row groups and files."""
    from sae_transfer.corpus import ROLE_CODE
    from sae_transfer.storage.activations_write import ActivationWriter, WriterConfig

    n, d = acts_ND.shape
    rows = np.arange(n)
    pos = (rows % seq_len).astype(np.int32)
    if token_ids_N is None:
        token_ids_N = torch.from_numpy((7 * rows) % 97)
    if roles_N is None:
        roles_N = torch.from_numpy(np.where(pos == 0, ROLE_CODE["bos"], ROLE_CODE["text"]).astype(np.uint8))
    meta = {"model_id": model_id, "hook": hook, "d_model": d, "dtype": "float32", "n_tokens": n,
            "context_size": seq_len, "prepend_bos": True}
    writer = ActivationWriter(path, meta, WriterConfig(shard_bytes=1 << 15, row_group_rows=row_group_rows))
    acts = acts_ND.float().contiguous()
    writer.append(rows // seq_len, pos, token_ids_N.numpy().astype(np.int32), roles_N.numpy().astype(np.uint8),
                  acts.norm(dim=-1).numpy(), acts.numpy().view(np.uint8))
    writer.finish()
    return Path(path)


def relu_sae(W_enc_DF: torch.Tensor, W_dec_FD: torch.Tensor | None = None, b_enc_F: torch.Tensor | None = None,
             metadata: dict | None = None):
    """A ReLU SAE with the given weights (decoder = encoder transposed unless given; zero biases)."""
    from sae_transfer.sae import ReluSAE, SAEConfig

    d, f = W_enc_DF.shape
    sae = ReluSAE(SAEConfig("standard", d, f, apply_b_dec_to_input=False, metadata=dict(metadata or {})))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc_DF)
        sae.W_dec.copy_(W_enc_DF.T if W_dec_FD is None else W_dec_FD)
        if b_enc_F is not None:
            sae.b_enc.copy_(b_enc_F)
    return sae


def loaded(sae, sae_id: str, model: str = "tiny-base", folder: str = "mem"):
    """`evals.loading.LoadedSAE` for an in-memory SAE."""
    from sae_transfer.evals.loading import LoadedSAE

    return LoadedSAE(sae, {"sae_id": sae_id, "sae_model": model, "sae_finetuned_from": None}, None, folder)
