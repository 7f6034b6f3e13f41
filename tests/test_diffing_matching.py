"""Latent matching: the assignment recovers a hidden permutation, the sparse top-c solver agrees
with the dense Hungarian, streaming correlation equals numpy's, drift ignores the folded scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_transfer.diffing import api
from sae_transfer.diffing.matching import MatchConfig, StreamingPearson, activation_correlation, latent_drift, match_decoders
from sae_transfer.sae.scaling import SCALE_KEY, fold_scale
from tests._diffing import loaded, relu_sae, write_acts_cache


def _random_sae(d: int, f: int, seed: int, metadata: dict | None = None):
    gen = torch.Generator().manual_seed(seed)
    return relu_sae(torch.randn(d, f, generator=gen), torch.randn(f, d, generator=gen),
                    0.1 * torch.randn(f, generator=gen), metadata)


def _permuted(sae, perm: torch.Tensor, dec_scale: float = 1.0):
    """B latent j = A latent perm[j] (decoder rows rescaled: cosines unchanged)."""
    return relu_sae(sae.W_enc.detach()[:, perm], sae.W_dec.detach()[perm] * dec_scale, sae.b_enc.detach()[perm])


@pytest.mark.parametrize("dense_max_pairs", [1 << 24, 0], ids=["dense", "sparse"])
def test_assignment_recovers_a_permutation(dense_max_pairs):
    a = _random_sae(24, 300, seed=0)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    b = _permuted(a, perm, dec_scale=3.0)
    m = match_decoders(a, b, MatchConfig(candidates=4, dense_max_pairs=dense_max_pairs, chunk_rows=64))
    assert m.method == ("dense" if dense_max_pairs else "sparse-top4")
    inverse = torch.argsort(perm).numpy()  # A latent i is B latent inverse[i]
    assert m.latent_a.tolist() == list(range(300)) and m.latent_b.tolist() == inverse.tolist()
    assert np.allclose(m.dec_cos, 1.0, atol=1e-6) and np.allclose(m.enc_cos, 1.0, atol=1e-6)


def _total_weight(m, cfg):
    return float(np.sum(m.dec_cos - cfg.min_cosine))


def test_sparse_top_c_agrees_with_dense_hungarian_on_noisy_copies():
    gen = torch.Generator().manual_seed(2)
    a = _random_sae(16, 120, seed=3)
    # B: a permuted noisy copy of 100 of A's latents plus 40 unrelated ones
    perm = torch.randperm(120, generator=gen)[:100]
    W_dec = torch.cat([a.W_dec.detach()[perm] + 0.6 * torch.randn(100, 16, generator=gen), torch.randn(40, 16, generator=gen)])
    b = relu_sae(torch.randn(16, 140, generator=gen), W_dec)
    dense_cfg = MatchConfig(min_cosine=0.3)
    sparse_cfg = MatchConfig(min_cosine=0.3, candidates=12, dense_max_pairs=0, chunk_rows=50)
    dense, sparse = match_decoders(a, b, dense_cfg), match_decoders(a, b, sparse_cfg)
    assert (dense.dec_cos > 0.3).all() and (sparse.dec_cos > 0.3).all()
    assert _total_weight(sparse, sparse_cfg) == pytest.approx(_total_weight(dense, dense_cfg), rel=1e-9)
    # brute force over all pairs agrees too: every matched pair is worth keeping, no latent twice
    assert len(set(dense.latent_b)) == len(dense.latent_b) and len(set(sparse.latent_b)) == len(sparse.latent_b)
    assert 60 < len(dense.latent_a) <= 120


def test_streaming_pearson_equals_numpy_corrcoef():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(1000, 5, generator=gen) * 3 + 100  # a large mean: the naive formula would lose digits
    b = 0.5 * a + torch.randn(1000, 5, generator=gen)
    b[:, 4] = 7.0  # constant: undefined
    acc = StreamingPearson(5)
    for s in range(0, 1000, 173):
        acc.add(a[s:s + 173], b[s:s + 173])
    got = acc.result()
    for j in range(4):
        assert got[j] == pytest.approx(np.corrcoef(a[:, j].double().numpy(), b[:, j].double().numpy())[0, 1], abs=1e-12)
    assert np.isnan(got[4])


def test_activation_correlation_of_matched_pairs(tmp_path):
    a, b = _random_sae(8, 40, seed=5), _random_sae(8, 50, seed=6)
    m = match_decoders(a, b, MatchConfig(min_cosine=-1.0))
    x = torch.randn(900, 8, generator=torch.Generator().manual_seed(7))
    corr, n = activation_correlation(a, b, m, [(x[:400], x[:400]), (x[400:], x[400:])], MatchConfig(batch_tokens=128))
    with torch.no_grad():
        fa, fb = a.encode(x).double().numpy(), b.encode(x).double().numpy()
    for i, j, c in zip(m.latent_a, m.latent_b, corr):
        if fa[:, i].std() > 0 and fb[:, j].std() > 0:
            assert c == pytest.approx(np.corrcoef(fa[:, i], fb[:, j])[0, 1], abs=1e-9)
    assert n == 900


def test_match_table_on_a_cache(tmp_path):
    a = _random_sae(8, 30, seed=8)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(9))
    b = _permuted(a, perm)
    cache = write_acts_cache(tmp_path / "chat", torch.randn(640, 8, generator=torch.Generator().manual_seed(10)))
    table = api.match_table(loaded(a, "a:1"), loaded(b, "b:1"), cache, "chat", MatchConfig()).to_pandas()
    live = table.dropna(subset=["act_corr"])
    assert len(live) > 20 and np.allclose(live["act_corr"], 1.0)  # the same latent read twice
    assert (table["n_tokens"] == 600).all()  # 640 rows minus 40 BOS rows
    assert set(table["corr_model"]) == {"chat"}


def test_drift_is_measured_in_training_units():
    parent_scaled = _random_sae(12, 20, seed=11)
    child_scaled = relu_sae(parent_scaled.W_enc.detach().clone(), parent_scaled.W_dec.detach().clone(),
                            parent_scaled.b_enc.detach().clone())
    with torch.no_grad():
        child_scaled.W_dec[3] *= 2.0  # a decoder row that grew
        child_scaled.W_enc[:, 5] = -child_scaled.W_enc[:, 5]  # an encoder column that flipped
        child_scaled.b_enc[7] += 0.25
    # saved SAEs have different training scales folded in (base vs chat activations)
    parent = fold_scale(parent_scaled, 2.0)
    parent.cfg.metadata[SCALE_KEY] = 2.0
    child = fold_scale(child_scaled, 5.0)
    child.cfg.metadata[SCALE_KEY] = 5.0
    d = latent_drift(child, parent)
    expected_dec = np.ones(20)
    expected_dec[3] = 2.0
    assert np.allclose(d["dec_norm_ratio"], expected_dec) and np.allclose(d["enc_norm_ratio"], 1.0)
    expected_cos = np.ones(20)
    expected_cos[5] = -1.0
    assert np.allclose(d["enc_cos"], expected_cos) and np.allclose(d["dec_cos"], 1.0)
    assert d["b_enc_delta"][7] == pytest.approx(0.25) and np.count_nonzero(d["b_enc_delta"]) == 1


def _run_main(monkeypatch, *args) -> int:
    import sys

    from sae_transfer.cli import main

    monkeypatch.setattr(sys, "argv", ["sae-transfer", *[str(a) for a in args]])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_diff_cli_writes_stats_matches_and_drift(tmp_path, monkeypatch, capsys):
    from sae_transfer.sae.io import save_sae
    from sae_transfer.storage.tables import read_table

    hook = "blocks.1.hook_resid_pre"
    gen = torch.Generator().manual_seed(12)
    base = write_acts_cache(tmp_path / "base", torch.randn(480, 8, generator=gen), hook=hook)
    chat = write_acts_cache(tmp_path / "chat", torch.randn(480, 8, generator=gen) + 0.3, hook=hook, model_id="tiny-chat")
    parent = _random_sae(8, 24, seed=13)
    child = _permuted(parent, torch.arange(24))  # an unchanged "fine-tune": drift cosines are 1
    save_sae(parent, tmp_path / "parent", metadata={"hook_name": hook, "model_name": "tiny-base"})
    save_sae(child, tmp_path / "child", metadata={"hook_name": hook, "model_name": "tiny-base", "finetuned_from": "parent"})
    out = tmp_path / "results"
    code = _run_main(monkeypatch, "diff", "--sae", tmp_path / "parent", "--sae", tmp_path / "child", "--base-acts", base,
                     "--chat-acts", chat, "--out", out, "--device", "cpu", "--batch-tokens", "100")
    assert code == 0, capsys.readouterr()
    stats = read_table(out, "latent_stats").to_pandas()
    assert len(stats) == 2 * 2 * 24 and set(stats.model) == {"base", "chat"}
    matches = read_table(out, "latent_matches").to_pandas()
    assert (matches.latent_a == matches.latent_b).all() and len(matches) == 24 and np.allclose(matches.dec_cos, 1.0)
    drift = read_table(out, "latent_drift").to_pandas()
    assert len(drift) == 24 and np.allclose(drift.dec_cos, 1.0) and np.allclose(drift.enc_norm_ratio, 1.0)
    assert "appears" in capsys.readouterr().out


def test_diff_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    base = write_acts_cache(tmp_path / "base", torch.randn(64, 8))
    code = _run_main(monkeypatch, "diff", "--sae", tmp_path / "nope", "--base-acts", base, "--out", tmp_path / "r")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --base-acts and --chat-acts are both needed") and len(err.splitlines()) == 1
    code = _run_main(monkeypatch, "diff", "--sae", tmp_path / "nope", "--base-acts", base, "--chat-acts", base,
                     "--out", tmp_path / "r")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--sae" in err and "no such folder" in err and len(err.splitlines()) == 1
