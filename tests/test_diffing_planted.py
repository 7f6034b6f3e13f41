"""The planted truth through the real code: build the planted pairs, cache both models of each
with the project's cache writer, pair the caches, train the BatchTopK crosscoder or run the
activation difference, and find the planted change (or, on the control pair, nothing).

Which method must find which kind, and the figure it must reach (cosine with the truth >= 0.9,
precision and recall >= 0.8 on the planted positions):
- added / removed (framing tokens, small rows): a chat-only / base-only crosscoder latent;
- token (an ordinary frequent token with a large row): the top token of the activation
  difference, one crosscoder latent (chat-only or changed) whose chat-minus-base write is v at
  this size (at the demo's it spreads, docs/diffing.md), and one latent of an SAE on chat − base;
- dense (a shift at every position of layer 1's input): the activation difference's overall mean
  and the crosscoder's b_dec, with no chat-only, base-only or changed latent;
- rotation / rescaled (a plane turned, a direction stretched): the activation difference's top
  principal directions;
- control (an identical copy): nothing under any method."""

from __future__ import annotations

import pytest
import torch

from sae_transfer.activations import CacheConfig, cache_activations
from sae_transfer.corpus import CorpusConfig
from sae_transfer.diffing.activation_diff import ActDiffConfig, activation_diff, subspace_cosine
from sae_transfer.diffing.crosscoder import CLASSES, chat_minus_base_FD, class_counts, latent_table
from sae_transfer.diffing.crosscoder_io import load_crosscoder
from sae_transfer.diffing.crosscoder_run import CrosscoderConfig, train_crosscoder
from sae_transfer.diffing.diff_sae import train_diff_sae
from sae_transfer.diffing.latent_scaling import crosscoder_scaling
from sae_transfer.diffing.paired import iter_paired, iter_paired_raw, open_pair
from sae_transfer.diffing.planted import build_planted, load_planted, planted_mask
from sae_transfer.diffing.planted_kinds import build_kinds
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
    cc = _crosscoder(paired, root / f"run-{name}")
    x_NMD, tok_N = [], []
    for rows in iter_paired(paired, 4096):
        x_NMD.append(rows.x_BMD)
        tok_N.append(rows.token_id_B)
    return pair, paired, cc, torch.cat(x_NMD), torch.cat(tok_N)


def _crosscoder(paired, out):
    return load_crosscoder(train_crosscoder(CrosscoderConfig(train=TRAIN), paired, out).crosscoder_dir)


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
    assert counts["chat_only"] == 0 and counts["base_only"] == 0 and counts["changed"] == 0, counts
    # identical models: every live latent's two decoders agree (independent draws left 0.2 here)
    assert float(table.cosine_F[alive_F].min()) >= 0.95, float(table.cosine_F[alive_F].min())


def _cache(root, corpus, model, hook):
    cfg = CacheConfig(model=str(model), hooks=(hook,), corpus=corpus, n_tokens=8192, context_size=64, device="cpu",
                      checksum=False)
    return cache_activations(cfg, root / "cache", progress=False)[0].path


@pytest.fixture(scope="module")
def kinds(planted):
    """Each planted kind's paired caches at its hook, and the kind."""
    pset, _, root = planted
    corpus = CorpusConfig(source=str(pset.corpus), eval_fraction=0.0)
    return {name: (k, open_pair(_cache(root, corpus, k.base, k.hook), _cache(root, corpus, k.chat, k.hook)))
            for name, k in build_kinds(pset).items()}


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1))


def test_activation_diff_tops_with_the_planted_tokens(planted):
    pset, caches, _ = planted
    for name in ("added", "removed"):
        pair = pset.pairs[name]
        paired = open_pair(caches[pair.base], caches[pair.chat])
        res = activation_diff(iter_paired_raw(paired), paired.d_model)
        keys_G = res.groups["token"].keys_G
        top = res.top_tokens(ActDiffConfig())[:len(pair.token_ids)]
        assert sorted(int(keys_G[i]) for i in top) == sorted(pair.token_ids), name


def test_ordinary_token_plant_tops_the_difference_and_is_one_crosscoder_latent(planted, kinds):
    kind, paired = kinds["token"]
    v = kind.truth_KD()[0]
    res = activation_diff(iter_paired_raw(paired), paired.d_model)
    top = res.top_tokens(ActDiffConfig())[0]
    assert int(res.groups["token"].keys_G[top]) == kind.token_ids[0]
    assert _cos(res.groups["token"].mean_GD[top], v) >= 0.9
    cc = _crosscoder(paired, planted[2] / "run-token")
    x_NMD, tok_N = [], []
    for rows in iter_paired(paired, 4096):
        x_NMD.append(rows.x_BMD)
        tok_N.append(rows.token_id_B)
    f_NF = cc.encode(torch.cat(x_NMD).flatten(1))
    cos_F = torch.nn.functional.cosine_similarity(chat_minus_base_FD(cc), v[None], dim=-1)
    cos_F[~(f_NF > 0).any(0)] = -1
    j = int(cos_F.argmax())
    fired_N, planted_N = f_NF[:, j] > 0, torch.isin(torch.cat(tok_N), torch.tensor(kind.token_ids))
    hits = int((fired_N & planted_N).sum())
    precision, recall = hits / max(int(fired_N.sum()), 1), hits / int(planted_N.sum())
    assert float(cos_F[j]) >= 0.9 and precision >= 0.8 and recall >= 0.8, (j, float(cos_F[j]), precision, recall)
    assert CLASSES[int(latent_table(cc).class_F[j])] in ("chat_only", "changed")


def test_dense_shift_is_a_changed_mean_not_new_latents(planted, kinds):
    kind, paired = kinds["dense"]
    c = kind.truth_KD()[0]
    res = activation_diff(iter_paired_raw(paired), paired.d_model)
    mean_D = res.groups["all"].mean_GD[0]
    assert _cos(mean_D, c) >= 0.9 and float(mean_D.norm()) == pytest.approx(kind.magnitude, rel=0.01)
    assert float(mean_D.norm()) >= 0.9 * float(res.groups["all"].mean_norm_G[0])  # every position, the same way
    cc = _crosscoder(paired, planted[2] / "run-dense")
    b_dec_MD = cc.b_dec.detach().view(2, -1) / cc.scales_M[:, None]
    assert _cos(b_dec_MD[1] - b_dec_MD[0], c) >= 0.9
    alive_F = (cc.encode(torch.cat([r.x_BMD for r in iter_paired(paired, 4096)]).flatten(1)) > 0).any(0)
    counts = class_counts(latent_table(cc), alive_F)
    assert counts["chat_only"] == counts["base_only"] == counts["changed"] == 0, counts


def test_rotated_plane_and_rescaled_direction_are_the_top_principal_directions(kinds):
    for name in ("rotation", "rescaled"):
        kind, paired = kinds[name]
        truth_KD = kind.truth_KD()
        res = activation_diff(iter_paired_raw(paired), paired.d_model)
        assert subspace_cosine(res.components_KD[:len(truth_KD)], truth_KD) >= 0.9, name


def test_control_pair_shows_nothing_in_the_activation_difference(planted):
    pset, caches, _ = planted
    pair = pset.pairs["control"]
    res = activation_diff(iter_paired_raw(open_pair(caches[pair.base], caches[pair.chat])), 32)
    assert res.total_variance == 0 and float(res.groups["token"].mean_norm_G.max()) == 0


DIFF_SAE = TrainConfig(arch="relu", d_sae=32, l1_coefficient=5.0, lr=1e-3, total_tokens=100_000, batch_size=512,
                       log_every_steps=100, checkpoint_every_tokens=10**9, dead_window_tokens=20_000, num_threads=1,
                       device="cpu")


def test_sae_on_the_difference_isolates_the_token_plant_and_finds_nothing_on_the_copy(planted, kinds):
    from sae_transfer.sae.io import load_sae

    kind, paired = kinds["token"]
    sae = load_sae(train_diff_sae(paired, DIFF_SAE, planted[2] / "diff-sae-token").sae_dir)
    rows = list(iter_paired_raw(paired))
    diff_ND = torch.cat([chat - base for _, _, _, base, chat in rows])
    cos_F = torch.nn.functional.cosine_similarity(sae.W_dec.detach(), kind.truth_KD()[0][None], dim=-1)
    j = int(cos_F.argmax())
    fired_N = sae.encode(diff_ND).detach()[:, j] > 0
    planted_N = torch.isin(torch.cat([r[0] for r in rows]), torch.tensor(kind.token_ids))
    hits = int((fired_N & planted_N).sum())
    precision, recall = hits / max(int(fired_N.sum()), 1), hits / int(planted_N.sum())
    assert float(cos_F[j]) >= 0.9 and precision >= 0.8 and recall >= 0.8, (j, float(cos_F[j]), precision, recall)
    pset, caches, root = planted
    control = pset.pairs["control"]
    assert train_diff_sae(open_pair(caches[control.base], caches[control.chat]), DIFF_SAE, root / "diff-sae-control") is None
