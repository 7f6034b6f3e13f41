"""Max-activating examples: the streaming top-k equals a brute-force sort over all tokens,
windows and histograms match the cache, and the tables answer DuckDB queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_transfer.diffing import api
from sae_transfer.diffing.examples import ExamplesConfig, MaxActTracker
from tests._diffing import loaded, relu_sae, write_acts_cache


def brute_top_k(feats_NF: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Per latent: row indices of its k largest positive activations, stable (earlier first among equals)."""
    out = []
    for j in range(feats_NF.shape[1]):
        v = feats_NF[:, j]
        nz = (v > 0).nonzero().squeeze(1)
        out.append(nz[torch.sort(v[nz], descending=True, stable=True).indices[:k]])
    return out


@pytest.mark.parametrize("batch", [1, 37, 500, 4000])
def test_streaming_top_k_equals_brute_force_with_ties(batch):
    gen = torch.Generator().manual_seed(1)
    N, F, k = 4000, 48, 6
    feats = torch.relu(torch.randn(N, F, generator=gen) - 0.8)
    feats = (feats * 10).round() / 10  # a coarse grid: many exact ties
    feats[:, 5] = 0.0  # a latent that never fires
    feats[:3, 7], feats[3:, 7] = 1.0, 0.0  # fires fewer than k times
    seq, pos = torch.arange(N) // 40, torch.arange(N) % 40
    tracker = MaxActTracker(F, ExamplesConfig(k=k))
    for s in range(0, N, batch):
        tracker.add(feats[s:s + batch], seq[s:s + batch], pos[s:s + batch])
    res = tracker.result()
    for j, rows in enumerate(brute_top_k(feats, k)):
        n = len(rows)
        assert torch.equal(res.value_FK[j, :n], feats[rows, j])
        assert torch.equal(res.seq_FK[j, :n], seq[rows]) and torch.equal(res.pos_FK[j, :n], pos[rows])
        assert bool((res.value_FK[j, n:] == 0).all()) and bool((res.seq_FK[j, n:] == -1).all())
    assert res.n_tokens == N
    assert int(res.hist_FH.sum()) == int((feats > 0).sum())


def test_histogram_matches_numpy():
    cfg = ExamplesConfig(k=2, hist_min=1e-2, hist_max=1e2, bins_per_decade=3)
    gen = torch.Generator().manual_seed(2)
    feats = torch.relu(torch.randn(3000, 4, generator=gen)).pow(3) * torch.tensor([1e-3, 1.0, 10.0, 300.0])
    tracker = MaxActTracker(4, cfg)
    tracker.add(feats, torch.zeros(3000, dtype=torch.long), torch.arange(3000))
    hist = tracker.result().hist_FH
    edges = np.concatenate([[0.0], cfg.edges, [np.inf]])
    for j in range(4):
        v = feats[:, j][feats[:, j] > 0].double().numpy()
        expected = [(v >= lo).sum() - (v >= hi).sum() for lo, hi in zip(edges[:-1], edges[1:])]
        assert hist[j].tolist() == [int(e) for e in expected]


@pytest.fixture(scope="module")
def cache_and_sae(tmp_path_factory):
    gen = torch.Generator().manual_seed(3)
    N, D, F, S = 1600, 8, 12, 16
    acts = torch.randn(N, D, generator=gen)
    acts[::S] *= 40  # BOS rows: huge, and skipped by default
    W = torch.randn(D, F, generator=gen)
    path = write_acts_cache(tmp_path_factory.mktemp("ex") / "chat", acts, seq_len=S, model_id="tiny-chat")
    return path, acts, relu_sae(W), S


def _as_arch(sae, arch: str):
    """The same weights as a ReLU, JumpReLU (threshold 0.3) or TopK (k = 3) SAE."""
    from sae_transfer.sae import SAEConfig, make_sae

    if arch == "relu":
        return sae
    out = make_sae(SAEConfig(arch, sae.d_in, sae.d_sae, apply_b_dec_to_input=False, k=3 if arch == "topk" else None))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(out, name).copy_(getattr(sae, name))
        if arch == "jumprelu":
            out.threshold.fill_(0.3)
    return out


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_examples_tables_match_brute_force(cache_and_sae, tmp_path, arch):
    path, acts, sae, S = cache_and_sae
    sae = _as_arch(sae, arch)
    cfg = ExamplesConfig(k=4, window_before=3, window_after=2, batch_tokens=300)
    examples, hist = api.examples_tables(loaded(sae, "sae:1"), path, "chat", cfg, tokenizer=None)
    keep = torch.arange(len(acts)) % S != 0  # BOS skipped
    rows_all = torch.arange(len(acts))[keep]
    with torch.no_grad():
        feats = sae.encode(acts)
    got = examples.to_pandas()
    token_ids = (7 * np.arange(len(acts))) % 97
    for j, idx in enumerate(brute_top_k(feats[keep], cfg.k)):
        rows = rows_all[idx].numpy()
        sub = got[got.latent == j].sort_values("rank")
        assert sub["seq_id"].tolist() == (rows // S).tolist() and sub["pos"].tolist() == (rows % S).tolist()
        assert np.allclose(sub["activation"], feats[rows, j].numpy(), rtol=1e-5)
        for _, r in sub.iterrows():
            lo, hi = max(r.pos - 3, 0), min(r.pos + 2, S - 1)  # clipped to the sequence
            base = r.seq_id * S
            assert r.window_start == lo
            assert list(r.token_ids) == token_ids[base + lo: base + hi + 1].tolist()
            assert np.allclose(r.acts, feats[base + lo: base + hi + 1, j].numpy(), rtol=1e-5, atol=1e-6)
            assert r.acts[r.pos - lo] == pytest.approx(r.activation, rel=1e-5)
    h = hist.to_pandas()
    for j in range(sae.d_sae):
        assert h[h.latent == j]["count"].sum() == int((feats[keep][:, j] > 0).sum())
    assert set(got["model"]) == {"chat"} and set(got["model_id"]) == {"tiny-chat"}
    assert (got["n_tokens"] == int(keep.sum())).all()


def test_latent_examples_answer_sql(cache_and_sae, tmp_path):
    from sae_transfer.storage.catalog import query
    from sae_transfer.storage.tables import append_rows

    path, acts, sae, S = cache_and_sae
    examples, hist = api.examples_tables(loaded(sae, "sae:1"), path, "chat", ExamplesConfig(k=3), tokenizer=None)
    append_rows(tmp_path, "latent_examples", examples)
    append_rows(tmp_path, "latent_histograms", hist)
    df = query(tmp_path, "select rank, activation, len(acts) as n from latent_examples where latent = ? and model = ? "
               "order by rank", [2, "chat"])
    expected = examples.filter(np.asarray(examples.column("latent")) == 2).column("activation").to_pylist()
    assert df["activation"].tolist() == pytest.approx(sorted(expected, reverse=True))
    assert df["rank"].tolist() == list(range(len(expected))) and (df["n"] > 0).all()
    total = query(tmp_path, "select sum(count) as c from latent_histograms where latent = ?", [2])["c"][0]
    assert total > 0


def test_examples_cli_then_sql(cache_and_sae, tmp_path, monkeypatch, capsys):
    import sys

    from sae_transfer.cli import main
    from sae_transfer.sae.io import save_sae

    path, acts, sae, S = cache_and_sae
    save_sae(sae, tmp_path / "sae", metadata={"hook_name": "blocks.1.hook_resid_pre"})

    def run(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["sae-transfer", *[str(a) for a in args]])
        try:
            main()
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    out = tmp_path / "results"
    assert run("examples", "--sae", tmp_path / "sae", "--chat-acts", path, "--out", out, "--k", 2, "--device", "cpu") == 0
    capsys.readouterr()
    assert run("sql", "select latent, rank, model from latent_examples where latent = 3 and model = 'chat' order by rank",
               "--results", out, "--format", "csv") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1:] == ["3,0,chat", "3,1,chat"]
    assert run("examples", "--sae", tmp_path / "sae", "--out", out) == 2
    assert "no activations" in capsys.readouterr().err
