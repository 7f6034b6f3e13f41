"""The activation-difference baseline on paired caches written with the real cache writer: its
group statistics against a pandas groupby, and each kind of plant found by the view that must
find it (a token's shift tops the token ranking, a dense shift is the overall mean, a rotated
or rescaled subspace is the top principal directions); an identical copy shows nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae_transfer.corpus import ROLE_CODE
from sae_transfer.diffing.activation_diff import (
    ActDiffConfig,
    activation_diff,
    aligned_latents,
    bucket_label,
    position_bucket,
    subspace_cosine,
)
from sae_transfer.diffing.paired import iter_paired_raw, open_pair
from sae_transfer.diffing.stage import DiffingPlan, activation_diff_tables
from tests._diffing import loaded, relu_sae, write_acts_cache

N, D, SEQ = 4096, 16, 32


def _base():
    gen = torch.Generator().manual_seed(0)
    x_ND = torch.randn(N, D, generator=gen) * 2
    rows = np.arange(N)
    pos = rows % SEQ
    roles = np.where(pos == 0, ROLE_CODE["bos"], np.where(pos < SEQ // 2, ROLE_CODE["user"], ROLE_CODE["assistant"]))
    return x_ND, torch.from_numpy((7 * rows) % 97), torch.from_numpy(roles.astype(np.uint8))


def _pair(tmp_path, chat_ND, x_ND, tok_N, role_N):
    rows = dict(seq_len=SEQ, token_ids_N=tok_N, roles_N=role_N)
    return open_pair(write_acts_cache(tmp_path / "base", x_ND, model_id="base", **rows),
                     write_acts_cache(tmp_path / "chat", chat_ND, model_id="chat", **rows))


def _unit(seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(seed)), dim=0)


def test_group_statistics_match_a_pandas_groupby(tmp_path):
    x_ND, tok_N, role_N = _base()
    chat_ND = x_ND + 0.3 * torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    pair = _pair(tmp_path, chat_ND, x_ND, tok_N, role_N)
    res = activation_diff(iter_paired_raw(pair), D)
    diff = (chat_ND - x_ND).double()
    df = pd.DataFrame({"token": tok_N.numpy(), "role": role_N.numpy(), "bucket": np.floor(np.log2(np.arange(N) % SEQ + 1)),
                       "norm": diff.norm(dim=-1).numpy(), "base_norm": x_ND.double().norm(dim=-1).numpy()})
    for kind, col in (("token", "token"), ("role", "role"), ("position", "bucket")):
        g = res.groups[kind]
        want = df.groupby(col).agg(count=("norm", "size"), mean_norm=("norm", "mean"), base=("base_norm", "mean"))
        assert g.keys_G.tolist() == [int(k) for k in want.index]
        assert g.count_G.tolist() == want["count"].tolist()
        assert np.allclose(g.mean_norm_G.numpy(), want["mean_norm"].to_numpy(), rtol=1e-6)
        assert np.allclose(g.base_norm_G.numpy(), want["base"].to_numpy(), rtol=1e-6)
    first = torch.from_numpy((df["token"] == res.groups["token"].keys_G[0].item()).to_numpy())
    assert torch.allclose(res.groups["token"].mean_GD[0].double(), diff[first].mean(0), atol=1e-5)
    # principal directions: the eigenvectors of the centred covariance of the difference
    cov = torch.cov(diff.T, correction=0)
    top = torch.linalg.eigh(cov).eigenvectors[:, -1]
    assert abs(float(res.components_KD[0].double() @ top)) > 0.999
    assert res.total_variance == pytest.approx(float(cov.trace()), rel=1e-6)
    assert [bucket_label(int(b)) for b in position_bucket(torch.tensor([0, 1, 2, 3, 6, 7]))] == \
        ["0", "1-2", "1-2", "3-6", "3-6", "7-14"]


def test_each_plant_is_found_by_its_view_and_the_copy_shows_nothing(tmp_path):
    x_ND, tok_N, role_N = _base()
    v, u, w = _unit(1), _unit(2), _unit(3)
    token = 5
    plants = {
        "token": x_ND + 3.0 * v * (tok_N == token).float()[:, None],  # one token's rows moved by 3·v
        "dense": x_ND + 0.5 * v,  # every position shifted by the same vector
        "rotation": x_ND + ((x_ND @ u)[:, None] * (w - u) + (x_ND @ w)[:, None] * (-u - w)) * 0.5,  # rotate span(u, w)
        "rescaled": x_ND + 1.5 * (x_ND @ u)[:, None] * u,  # the u component × 2.5, nothing else
        "control": x_ND.clone(),
    }
    cfg = ActDiffConfig(n_components=2)
    found = {}
    for name, chat_ND in plants.items():
        res = activation_diff(iter_paired_raw(_pair(tmp_path / name, chat_ND, x_ND, tok_N, role_N)), D, cfg)
        found[name] = res
    # a single token's plant tops the token ranking, with its direction
    res = found["token"]
    top = res.top_tokens(cfg)[0]
    assert int(res.groups["token"].keys_G[top]) == token
    assert float(torch.nn.functional.cosine_similarity(res.groups["token"].mean_GD[top], v, dim=0)) > 0.99
    # a dense shift is the overall mean, and no principal direction carries it
    res = found["dense"]
    mean = res.groups["all"].mean_GD[0]
    assert float(torch.nn.functional.cosine_similarity(mean, v, dim=0)) > 0.99
    assert float(mean.norm()) == pytest.approx(0.5, rel=1e-4)
    assert res.total_variance < 1e-8
    # a rotated plane and a rescaled direction are the top principal directions
    assert subspace_cosine(found["rotation"].components_KD, torch.stack([u, w])) > 0.99
    assert abs(float(found["rescaled"].components_KD[0] @ u)) > 0.99
    # the identical copy: nothing anywhere
    res = found["control"]
    assert res.total_variance == 0 and float(res.groups["token"].mean_norm_G.max()) == 0


def test_table_rows_and_sae_alignment(tmp_path):
    x_ND, tok_N, role_N = _base()
    v = _unit(1)
    pair = _pair(tmp_path, x_ND + 3.0 * v * (tok_N == 5).float()[:, None], x_ND, tok_N, role_N)
    W_dec_FD = torch.nn.functional.normalize(torch.randn(8, D, generator=torch.Generator().manual_seed(4)), dim=-1)
    W_dec_FD[6] = -v  # a latent whose decoder is the planted direction (sign ignored)
    sae = loaded(relu_sae(W_dec_FD.T.contiguous()), "sae-chat")
    from tests._tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")  # a local folder: token texts never reach for the Hub
    tables = activation_diff_tables(pair, DiffingPlan(device="cpu"), {"chat": sae}, ActDiffConfig(n_components=2),
                                    chat_model=str(tmp_path / "tok"))
    df = pd.concat([t.to_pandas() for t in tables["activation_diff"]])
    tokens = df[df["kind"] == "token"].sort_values("rank")
    assert tokens.iloc[0]["token_id"] == 5 and tokens.iloc[0]["key"] == "5"
    assert tokens.iloc[0]["token"] == tokenizer.decode([5])
    assert tokens.iloc[0]["mean_diff_norm"] == pytest.approx(3.0, rel=1e-4)
    assert set(df[df["kind"] == "role"]["key"]) == {"bos", "user", "assistant"}
    best = df[(df["kind"] == "component_latent") & (df["component"] == 0)].sort_values("rank").iloc[0]
    assert best["latent"] == 6 and best["latent_cos"] > 0.99 and best["dictionary"] == "sae-chat"
    lat, cos = aligned_latents(torch.stack([v]), W_dec_FD, 2)
    assert int(lat[0, 0]) == 6 and float(cos[0, 0]) == pytest.approx(1.0, abs=1e-6)


def test_task_appends_the_table_to_the_catalog(tmp_path):
    from sae_transfer.sae.io import save_sae
    from sae_transfer.storage import catalog
    from sae_transfer.study import DiffingSection
    from sae_transfer.tasks.diffing import activation_diff as task
    from sae_transfer.tasks.records import ActsRecord, SAERecord

    x_ND, tok_N, role_N = _base()
    hook = "blocks.1.hook_resid_pre"
    noise_ND = 0.05 * torch.randn(N, D, generator=torch.Generator().manual_seed(7))
    pair = _pair(tmp_path, x_ND + noise_ND + 3.0 * _unit(1) * (tok_N == 5).float()[:, None], x_ND, tok_N, role_N)
    save_sae(relu_sae(torch.randn(D, 8)), tmp_path / "sae", metadata={"hook_name": hook, "model_name": "base"})
    acts = {m: ActsRecord(path=str(p), model=m, hook=hook, n_tokens=N, reused=False)
            for m, p in (("base", pair.base), ("chat", pair.chat))}
    sae = SAERecord(path=str(tmp_path / "sae"), run_dir=str(tmp_path), model="base", hook=hook, role="base")
    from prefect.logging import disable_run_logger

    with disable_run_logger():  # the task body outside a flow run
        rec = task.fn([sae], acts["base"], acts["chat"], DiffingSection().stats_tokens, "cpu", str(tmp_path / "results"))
    assert rec.rows["activation_diff"] > 10
    top = catalog.query(tmp_path / "results", "select token_id from activation_diff where kind = 'token' and rank = 0")
    assert top["token_id"].tolist() == [5]
    from sae_transfer.report.build import _q

    con = catalog.connect(tmp_path / "results")
    try:  # the report's queries see every kind of row of the newest pass
        groups = _q(con, "activation_diff_groups", ["base", "chat"])
        tokens = _q(con, "activation_diff_tokens", ["base", "chat"])
    finally:
        con.close()
    assert set(groups["kind"]) == {"all", "role", "position", "component"}
    assert groups[groups["kind"] == "component"]["aligned_latents"].str.contains(r":\d+ \(0\.\d+\)").all()
    assert tokens.iloc[0]["token_id"] == 5 and tokens.iloc[0]["rel_to_typical"] > 3


def test_task_refuses_caches_of_different_tokens(tmp_path):
    from sae_transfer.errors import UserError
    from sae_transfer.study import DiffingSection
    from sae_transfer.tasks.diffing import activation_diff as task
    from sae_transfer.tasks.records import ActsRecord

    x_ND, tok_N, role_N = _base()
    hook = "blocks.1.hook_resid_pre"
    base = write_acts_cache(tmp_path / "base", x_ND, seq_len=SEQ, model_id="base", token_ids_N=tok_N, roles_N=role_N)
    chat = write_acts_cache(tmp_path / "chat", x_ND, seq_len=SEQ, model_id="chat", token_ids_N=(tok_N + 1) % 97,
                            roles_N=role_N)
    acts = [ActsRecord(path=str(p), model=m, hook=hook, n_tokens=N, reused=False) for m, p in (("base", base), ("chat", chat))]
    with pytest.raises(UserError, match="token_id"):
        task.fn([], acts[0], acts[1], DiffingSection().stats_tokens, "cpu", str(tmp_path / "results"))


@pytest.mark.cuda
def test_activation_diff_on_the_gpu_equals_the_cpu_pass(tmp_path):
    """The sums stay on the device (only the results come back) and give the CPU's answer."""
    x_ND, tok_N, role_N = _base()
    chat_ND = x_ND + 0.3 * torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    pair = _pair(tmp_path, chat_ND, x_ND, tok_N, role_N)
    cpu = activation_diff(iter_paired_raw(pair), D)
    gpu = activation_diff(iter_paired_raw(pair), D, device="cuda")
    for kind, g in cpu.groups.items():
        h = gpu.groups[kind]
        assert torch.equal(h.keys_G, g.keys_G) and torch.equal(h.count_G, g.count_G)
        torch.testing.assert_close(h.mean_GD, g.mean_GD, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h.mean_norm_G, g.mean_norm_G, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gpu.variance_K, cpu.variance_K, atol=1e-5, rtol=1e-5)
    assert abs((gpu.components_KD[0] @ cpu.components_KD[0]).item()) > 0.999
