"""A crosscoder trained on two models that agree must end with agreeing decoders.

Identical inputs give both decoder halves of a latent the same gradient, so whatever they
disagree on at the end is what they disagreed on at the start. With each model's half drawn
independently, rarely firing latents kept their two unrelated random rows (a third of the live
latents below cosine 0.95 on this data, the worst at 0.15); with one shared draw every live
latent ends at cosine 1. A chat model that is the base model times 3 is the same pair once
each model is scaled by its own factor (BatchTopK's threshold then sees equal inputs)."""

from __future__ import annotations

import pytest
import torch

from sae_transfer.diffing.crosscoder import class_counts, latent_table
from sae_transfer.diffing.crosscoder_io import load_crosscoder
from sae_transfer.diffing.crosscoder_run import CrosscoderConfig, train_crosscoder
from sae_transfer.diffing.paired import iter_paired, open_pair
from sae_transfer.training.config import TrainConfig
from tests._diffing import write_acts_cache

TRAIN = TrainConfig(arch="batchtopk", d_sae=64, k=4, lr=1e-3, total_tokens=120_000, batch_size=512,
                    lr_warmup_frac=0.05, log_every_steps=100, checkpoint_every_tokens=10**9,
                    dead_window_tokens=20_000, num_threads=1, device="cpu")


def sparse_acts(n: int = 16_384, d: int = 32, n_features: int = 48, seed: int = 0) -> torch.Tensor:
    """[n, d] sums of sparse unit features whose firing rates span 3e-4 .. 0.1 (rare ones too)."""
    gen = torch.Generator().manual_seed(seed)
    feats_GD = torch.nn.functional.normalize(torch.randn(n_features, d, generator=gen), dim=-1)
    on_NG = torch.rand(n, n_features, generator=gen) < torch.logspace(-3.5, -1, n_features)
    return (on_NG * (0.5 + torch.rand(n, n_features, generator=gen))) @ feats_GD + 0.01 * torch.randn(n, d, generator=gen)


@pytest.mark.parametrize("chat_factor", [1.0, 3.0])
def test_identical_pair_has_agreeing_decoders(tmp_path, chat_factor):
    x_ND = sparse_acts()
    pair = open_pair(write_acts_cache(tmp_path / "base", x_ND, model_id="base"),
                     write_acts_cache(tmp_path / "chat", x_ND * chat_factor, model_id="chat"))
    cc = load_crosscoder(train_crosscoder(CrosscoderConfig(train=TRAIN), pair, tmp_path / "run").crosscoder_dir)
    x_NMD = torch.cat([rows.x_BMD for rows in iter_paired(pair, 8192)])
    alive_F = (cc.encode(x_NMD.flatten(1)) > 0).any(0)
    assert int(alive_F.sum()) >= TRAIN.d_sae // 2
    table = latent_table(cc)
    cos_F = table.cosine_F[alive_F]
    assert float(cos_F.min()) >= 0.95, (float(cos_F.median()), float(cos_F.min()))
    counts = class_counts(table, alive_F)
    assert counts["shared"] == int(alive_F.sum()), counts


def test_a_run_folder_from_the_independent_init_is_refused_not_reused(tmp_path):
    import json

    from sae_transfer.errors import UserError

    x_ND = sparse_acts(n=2048)
    pair = open_pair(write_acts_cache(tmp_path / "base", x_ND, model_id="base"),
                     write_acts_cache(tmp_path / "chat", x_ND, model_id="chat"))
    cfg = CrosscoderConfig(train=TrainConfig(**{**TRAIN.to_dict(), "adam_betas": TRAIN.adam_betas, "total_tokens": 2048}),
                           eval_tokens=512)
    done = train_crosscoder(cfg, pair, tmp_path / "run")
    manifest = json.loads(done.run_json.read_text())
    del manifest["config"]["decoder_init"]  # what a run trained before the one-draw init recorded
    done.run_json.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="different config"):
        train_crosscoder(cfg, pair, tmp_path / "run")
