"""The planted truth through the real code: build the planted pairs, cache both models of each
with the project's cache writer, pair the caches, train the BatchTopK crosscoder, and find
the planted direction (or, on the control pair, nothing)."""

from __future__ import annotations

import pytest
import torch

from sae_transfer.activations import CacheConfig, cache_activations
from sae_transfer.corpus import CorpusConfig
from sae_transfer.diffing.crosscoder import CLASSES, class_counts, latent_table
from sae_transfer.diffing.crosscoder_io import load_crosscoder
from sae_transfer.diffing.crosscoder_run import CrosscoderConfig, train_crosscoder
from sae_transfer.diffing.latent_scaling import crosscoder_scaling
from sae_transfer.diffing.paired import iter_paired, open_pair
from sae_transfer.diffing.planted import build_planted, load_planted, planted_mask
from sae_transfer.training.config import TrainConfig

HOOK = "blocks.0.hook_resid_pre"  # Llama: the embedding itself, so +α·v is exact at planted rows
TRAIN = TrainConfig(arch="batchtopk", d_sae=128, k=4, lr=1e-3, total_tokens=300_000, batch_size=512,
                    lr_warmup_frac=0.05, log_every_steps=100, checkpoint_every_tokens=10**9,
                    dead_window_tokens=20_000, num_threads=1, device="cpu")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    pset = build_planted(root / "models")
    corpus = CorpusConfig(source=str(pset.corpus), eval_fraction=0.0)
    caches = {}
    for pair in pset.pairs.values():
        for model in (pair.base, pair.chat):
            if model not in caches:
                cfg = CacheConfig(model=str(model), hooks=(HOOK,), corpus=corpus, n_tokens=8192, context_size=64,
                                  device="cpu", checksum=False)
                caches[model] = cache_activations(cfg, root / "cache", progress=False)[0].path
    return pset, caches, root


def _train(planted, name: str):
    pset, caches, root = planted
    pair = pset.pairs[name]
    paired = open_pair(caches[pair.base], caches[pair.chat])
    result = train_crosscoder(CrosscoderConfig(train=TRAIN), paired, root / f"run-{name}")
    cc = load_crosscoder(result.crosscoder_dir)
    x_NMD, tok_N = [], []
    for rows in iter_paired(paired, 4096):
        x_NMD.append(rows.x_BMD)
        tok_N.append(rows.token_id_B)
    return pair, paired, cc, torch.cat(x_NMD), torch.cat(tok_N)


def _found(cc, x_NMD, tok_N, pair, side: int):
    """(latent, cosine of its `side` decoder with the planted direction, precision, recall)."""
    cos_F = torch.nn.functional.cosine_similarity(cc.decoders_MFD()[side].detach(), pair.direction_D()[None], dim=-1)
    j = int(cos_F.argmax())
    fired_N = cc.encode(x_NMD.flatten(1))[:, j] > 0
    planted_N = planted_mask(tok_N, pair)
    hits = int((fired_N & planted_N).sum())
    return j, float(cos_F[j]), hits / max(int(fired_N.sum()), 1), hits / int(planted_N.sum())


def test_planted_set_records_what_it_built(planted):
    pset, _, _ = planted
    again = load_planted(pset.root)
    assert again is not None and again.pairs["added"].token_ids == pset.pairs["added"].token_ids
    v, u = pset.pairs["added"].direction_D(), pset.pairs["removed"].direction_D()
    assert abs(float(v.norm()) - 1) < 1e-6 and abs(float(v @ u)) < 1e-6
    from safetensors.torch import load_file

    def emb(folder):
        return load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]

    added = pset.pairs["added"]
    diff_VD = emb(added.chat) - emb(added.base)  # exactly α·v on the planted rows, 0 elsewhere
    rows = list(added.token_ids)
    assert torch.allclose(diff_VD[rows], (added.magnitude * v).expand(len(rows), -1), atol=1e-6)
    assert float(diff_VD[[i for i in range(diff_VD.shape[0]) if i not in rows]].abs().max()) == 0.0
    assert torch.equal(emb(pset.pairs["control"].chat), emb(pset.pairs["control"].base))


def test_added_direction_is_a_chat_only_latent(planted):
    pair, _, cc, x_NMD, tok_N = _train(planted, "added")
    j, cos, precision, recall = _found(cc, x_NMD, tok_N, pair, side=1)
    table = latent_table(cc)
    assert cos >= 0.9 and precision >= 0.9 and recall >= 0.9, (j, cos, precision, recall)
    assert CLASSES[int(table.class_F[j])] == "chat_only", float(table.rho_F[j])
    # Latent Scaling: the base activations do not carry v (ν^ε small), nor do other latents rebuild it (ν^r small)
    scaling = crosscoder_scaling(cc, [x_NMD[i:i + 4096] for i in range(0, len(x_NMD), 4096)], torch.tensor([j]))
    assert abs(float(scaling.beta_error_chat_L[0]) - 1) < 0.2
    assert abs(float(scaling.nu_error_L[0])) < 0.2 and abs(float(scaling.nu_recon_L[0])) < 0.2
    assert scaling.verdicts() == ["specific"]


def test_removed_direction_is_a_base_only_latent(planted):
    pair, _, cc, x_NMD, tok_N = _train(planted, "removed")
    j, cos, precision, recall = _found(cc, x_NMD, tok_N, pair, side=0)
    assert cos >= 0.9 and precision >= 0.9 and recall >= 0.9, (j, cos, precision, recall)
    assert CLASSES[int(latent_table(cc).class_F[j])] == "base_only"


def test_control_pair_has_no_chat_only_latent(planted):
    _, paired, cc, x_NMD, _ = _train(planted, "control")
    assert paired.scale_base == paired.scale_chat
    alive_F = (cc.encode(x_NMD.flatten(1)) > 0).any(0)
    table = latent_table(cc)
    counts = class_counts(table, alive_F)
    assert counts["chat_only"] == 0 and counts["base_only"] == 0, counts
    # identical models: every live latent's two decoders agree (independent draws left 0.2 here)
    assert float(table.cosine_F[alive_F].min()) >= 0.95, float(table.cosine_F[alive_F].min())
