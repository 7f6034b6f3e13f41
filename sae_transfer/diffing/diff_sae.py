"""An SAE trained on the activation difference chat − base (the diffing-toolkit family's
"SAE on differences"; Aranguri, Drori and Nanda 2025 train such diff-SAEs beside crosscoders).

A crosscoder reconstructs both models and is free to spread a change over the latents that
already fire where it happens: on the demo pair a direction planted on one token's embedding
row ends as a 4–7 % share in each of ~50 latents (docs/diffing.md). A dictionary of Δ itself
has nothing else to spend its latents on, so a change confined to some tokens becomes its own
latent. It cannot see anything the two models share, and a change common to every token is
b_dec, not a latent (the activation difference's overall mean reports it).

It trains through the shared SAE run driver (`sae_transfer.training.run.train_sae`, resumable,
the usual SAE folder) on a stream of Δ in raw model units cut from the paired shuffle buffer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sae_transfer.diffing.paired import PairedCaches, PairedSource, read_paired
from sae_transfer.training.config import TrainConfig
from sae_transfer.training.run import RunResult, train_sae

log = logging.getLogger(__name__)


def diff_source(pair: PairedCaches, batch_size: int, seed: int = 0, buffer_tokens: int = 65_536):
    """start_batch -> iterator of Δ batches [B, D] (x_chat − x_base, raw model units): the
    SourceFactory the SAE training loop resumes from."""
    D = pair.d_model

    def make(start_batch: int):
        src = PairedSource(pair, batch_size, seed, buffer_tokens, start_batch)
        return (x_B2D[:, D:] / pair.scale_chat - x_B2D[:, :D] / pair.scale_base for x_B2D in src)

    return make


def train_diff_sae(pair: PairedCaches, cfg: TrainConfig, out_dir: str | Path, buffer_tokens: int = 65_536,
                   progress: bool = False) -> RunResult | None:
    """Train (or resume, or find finished) an SAE on chat − base into out_dir; None when the
    two caches agree on every sampled row (nothing to learn: the control's answer)."""
    sample = read_paired(pair, 0, min(pair.n_tokens, cfg.scale_estimate_tokens)).x_BMD
    diff_ND = sample[:, 1] / pair.scale_chat - sample[:, 0] / pair.scale_base
    if float(diff_ND.abs().max()) == 0.0:
        log.info("diff SAE: the two caches agree on the first %d rows; nothing to learn", len(diff_ND))
        return None
    meta = {"model_name": f"{pair.meta.get('chat_model')} - {pair.meta.get('base_model')}", "hook_name": pair.hook,
            "context_size": pair.meta.get("context_size"), "prepend_bos": pair.meta.get("prepend_bos"),
            "diff_of": {"base": pair.meta.get("base_model"), "chat": pair.meta.get("chat_model")}}
    return train_sae(cfg, diff_source(pair, cfg.batch_size, cfg.seed, buffer_tokens), pair.d_model, out_dir,
                     metadata=meta, progress=progress)
