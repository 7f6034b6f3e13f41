"""Crosscoder maths, pairing, format and resume; Latent Scaling against hand-set answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sae_transfer.diffing import crosscoder_run
from sae_transfer.diffing.crosscoder import CLASSES, CrossCoder, Taxonomy, chat_minus_base_FD, classify, latent_table
from sae_transfer.diffing.crosscoder_io import load_crosscoder, save_crosscoder
from sae_transfer.diffing.crosscoder_run import CrosscoderConfig, train_crosscoder
from sae_transfer.diffing.latent_scaling import LatentScaler, sae_scaling
from sae_transfer.diffing.paired import PairedSource, iter_paired, open_pair
from sae_transfer.errors import UserError
from sae_transfer.sae import SAEConfig, make_sae
from sae_transfer.storage import checkpoints as ckpt
from sae_transfer.training.config import TrainConfig
from sae_transfer.training.trainers.crosscoder import CrosscoderTrainer

D = 8


def _write(path, acts_ND, tokens_N, hook="blocks.0.hook_resid_pre", seq_len=32, corpus="c0"):
    from sae_transfer.storage.activations_write import ActivationWriter, WriterConfig

    n = acts_ND.shape[0]
    meta = {"model_id": path.name, "hook": hook, "d_model": acts_ND.shape[1], "dtype": "float32", "n_tokens": n,
            "context_size": seq_len, "corpus_fingerprint": corpus, "split": "train", "prepend_bos": True}
    writer = ActivationWriter(path, meta, WriterConfig(row_group_rows=256))
    rows = np.arange(n)
    writer.append(rows // seq_len, (rows % seq_len).astype(np.int32), tokens_N.astype(np.int32),
                  np.ones(n, dtype=np.uint8), acts_ND.norm(dim=-1).numpy(), acts_ND.numpy().view(np.uint8))
    writer.finish()
    return path


def _pair_data(n=2048, seed=0):
    """Sparse base activations; chat = base + 3·v on tokens 7 (a chat-only direction)."""
    gen = torch.Generator().manual_seed(seed)
    W_GD = torch.nn.functional.normalize(torch.randn(16, D, generator=gen), dim=-1)
    base = ((torch.rand(n, 16, generator=gen) < 0.15) * torch.rand(n, 16, generator=gen)) @ W_GD
    tokens = torch.randint(0, 50, (n,), generator=gen).numpy()
    v = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    chat = base + 3.0 * torch.from_numpy(tokens == 7)[:, None].float() * v
    return base, chat, tokens


@pytest.fixture
def caches(tmp_path):
    base, chat, tokens = _pair_data()
    return _write(tmp_path / "base", base, tokens), _write(tmp_path / "chat", chat, tokens), tmp_path


def test_pairing_scales_each_model_by_its_own_factor(caches):
    b, c, _ = caches
    pair = open_pair(b, c)
    base, chat, tokens = _pair_data()
    rows = next(iter_paired(pair, 100))
    assert torch.allclose(rows.x_BMD[:, 0], base[:100] * (D ** 0.5 / base.norm(dim=-1).double().mean()).float(), atol=1e-5)
    assert torch.allclose(rows.x_BMD[:, 1], chat[:100] * (D ** 0.5 / chat.norm(dim=-1).double().mean()).float(), atol=1e-5)
    assert rows.token_id_B.tolist() == tokens[:100].tolist()


@pytest.mark.parametrize("change, message", [
    ("tokens", "differ at row 5"), ("rows", "rows"), ("hook", "different hooks"), ("corpus", "different corpora"),
])
def test_misaligned_caches_are_one_clear_error(tmp_path, change, message):
    base, chat, tokens = _pair_data(n=1024)
    b = _write(tmp_path / "base", base, tokens)
    other_tokens = tokens.copy()
    if change == "tokens":
        other_tokens[5] += 1
    kwargs = {"hook": "blocks.1.hook_resid_pre"} if change == "hook" else {"corpus": "c1"} if change == "corpus" else {}
    n = 992 if change == "rows" else 1024
    c = _write(tmp_path / "chat", chat[:n], other_tokens[:n], **kwargs)
    with pytest.raises(UserError, match=message) as err:
        open_pair(b, c)
    assert "\n" not in str(err.value)


def test_paired_stream_resumes_exactly_and_covers_each_row_once_per_epoch(tmp_path):
    acts = torch.randn(2048, D)
    acts[:, 0] = torch.arange(2048.0)  # the row id, to see which rows a batch holds
    tokens = np.zeros(2048, dtype=np.int64)
    pair = open_pair(_write(tmp_path / "b", acts, tokens), _write(tmp_path / "c", acts * 2, tokens))
    whole = list(PairedSource(pair, 100, seed=3, buffer_tokens=512, epochs=2))
    resumed = list(PairedSource(pair, 100, seed=3, buffer_tokens=512, epochs=2, start_batch=7))
    assert len(resumed) == len(whole) - 7 and all(torch.equal(x, y) for x, y in zip(whole[7:], resumed))
    rows = torch.cat(whole[: len(whole) // 2])[:, 0] / pair.scale_base
    assert torch.allclose(rows, torch.cat(whole[: len(whole) // 2])[:, D] / pair.scale_chat / 2, atol=1e-2)  # halves pair up
    ids = rows.round().long()
    assert len(set(ids.tolist())) == ids.numel() and ids.numel() > 1800  # each row at most once per epoch


def test_batchtopk_scores_weigh_codes_by_both_decoder_norms():
    cc = CrossCoder.create(2, 2, k=1)
    with torch.no_grad():
        cc.W_enc.copy_(torch.eye(4)[:, :2])  # latent 0 reads base[0], latent 1 reads base[1]
        cc.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 3.0, 0, 4.0]]))  # norm sums 1 and 3 + 4
    x_B4 = torch.tensor([[2.0, 1.0, 0, 0]])  # code 2 for latent 0, 1 for latent 1
    f_BF = cc.encode(x_B4)  # scores 2·1 = 2 < 1·7 = 7: latent 1 wins although its code is smaller
    assert f_BF.tolist() == [[0.0, 1.0]]
    trainer = CrosscoderTrainer(cc, TrainConfig(arch="batchtopk", k=1, d_sae=2, total_tokens=1, batch_size=1))
    vals, token, latent = trainer.select((x_B4 @ cc.W_enc).detach())
    assert latent.tolist() == [1] and vals.tolist() == [1.0] and float(trainer._min_score) == 7.0  # the threshold tracks scores


def test_crosscoder_loss_gradient_matches_autograd_of_the_dense_objective():
    torch.manual_seed(0)
    cc = CrossCoder.create(D, 32, k=3)
    cfg = TrainConfig(arch="batchtopk", k=3, d_sae=32, total_tokens=64, batch_size=64, aux_coefficient=0.0)
    trainer = CrosscoderTrainer(cc, cfg, "csr")
    trainer.init_weights(torch.Generator().manual_seed(1), torch.randn(2 * D) * 0.1)
    with torch.no_grad():
        cc.W_dec.mul_(torch.rand(32, 1) + 0.5)  # unequal decoder norms: the score matters
    x_B2D = torch.randn(64, 2 * D)
    out = trainer.loss(x_B2D, 0, None)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in cc.named_parameters()}
    cc.zero_grad()
    # independent: dense pre-activations, mask of the B·k largest scores, plain autograd
    pre = x_B2D @ cc.W_enc + cc.b_enc
    score = torch.relu(pre) * cc.decoder_norms_MF().sum(0).detach()
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[score.flatten().topk(64 * 3).indices] = True
    f = torch.relu(pre) * mask.view_as(pre)
    x_hat = f @ cc.W_dec + cc.b_dec
    ((x_hat - x_B2D) ** 2).sum(-1).mean().backward()
    for name, p in cc.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-5), name


def test_taxonomy_uses_the_papers_cutoffs_on_rho():
    rho = torch.tensor([0.0, 0.1, 0.16, 0.3, 0.45, 0.5, 0.55, 0.7, 0.84, 1.0, float("nan")])
    assert [CLASSES[i] for i in classify(rho, Taxonomy())] == [
        "base_only", "base_only", "base_only", "other", "shared", "shared", "shared", "other", "chat_only", "chat_only", "other"]
    cc = CrossCoder.create(2, 3, k=1)
    with torch.no_grad():  # latent 0: chat only; 1: base only; 2: same direction, equal norms
        cc.W_dec.copy_(torch.tensor([[0.0, 0, 3, 4], [1.0, 0, 0, 0], [0.6, 0.8, 0.6, 0.8]]))
    t = latent_table(cc)
    assert (torch.allclose(t.rho_F, torch.tensor([1.0, 0.0, 0.5]))
            and torch.allclose(t.delta_norm_F, torch.tensor([1.0, 0.0, 0.5])))
    assert float(t.cosine_F[2]) == pytest.approx(1.0) and torch.isnan(t.cosine_F[:2]).all()


def test_taxonomy_reads_direction_shared_needs_agreeing_decoders_changed_points_apart():
    cc = CrossCoder.create(2, 5, k=1)
    with torch.no_grad():
        cc.scales_M.copy_(torch.tensor([2.0, 4.0]))
        cc.W_dec.copy_(torch.tensor([
            [0.6, 0.8, 0.6, 0.8],  # 0: same direction, equal norms -> shared
            [1.0, 0.0, 0.0, 1.0],  # 1: equal norms, orthogonal -> changed
            [1.0, 0.0, 0.0, 1.5],  # 2: norms 1 / 1.5 (rho 0.6, outside the shared band), orthogonal -> changed
            [1.0, 0.0, 0.9, 0.1],  # 3: equal-ish norms, cosine 0.99 -> shared
            [1.0, 0.0, -1.0, 0.0],  # 4: opposite -> changed
        ]))
    t = latent_table(cc)
    assert [CLASSES[i] for i in t.class_F] == ["shared", "changed", "changed", "shared", "changed"]
    assert torch.allclose(t.diff_norm_F, torch.tensor([0.0, 2 ** 0.5, (1 + 1.5 ** 2) ** 0.5, 0.02 ** 0.5, 2.0]), atol=1e-6)
    # chat-minus-base write in model units: d^chat / s_chat - d^base / s_base
    assert torch.allclose(chat_minus_base_FD(cc)[1], torch.tensor([0.0 - 0.5, 0.25 - 0.0]))
    # without cosines the classes are the norm-only ones, so the direction is what made 1, 2, 4 "changed"
    assert [CLASSES[i] for i in classify(t.rho_F)] == ["shared", "shared", "other", "shared", "shared"]
    with pytest.raises(ValueError, match="agree_min_cos"):
        Taxonomy(agree_min_cos=1.5)


def test_difference_explained_reads_what_the_crosscoder_learnt_about_chat_minus_base():
    from sae_transfer.diffing.crosscoder import difference_explained

    D = 4
    gen = torch.Generator().manual_seed(0)
    base_ND = torch.randn(512, D, generator=gen)
    v = torch.tensor([0.0, 0.0, 0.0, 2.0])
    on_N = torch.rand(512, generator=gen) < 0.3
    chat_ND = base_ND + on_N[:, None] * v
    x_N2D = torch.cat([base_ND, chat_ND], dim=1)
    exact = CrossCoder.create(D, 4 * D, k=4 * D)  # latent i reads coordinate i (±) of [x_base, x_chat], writes it back
    with torch.no_grad():
        eye = torch.eye(2 * D)
        exact.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        exact.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        exact.threshold.fill_(0.0)
    assert difference_explained(exact, [x_N2D[:256], x_N2D[256:]]) == pytest.approx(1.0, abs=1e-6)
    # the same codes with each latent writing one vector into both models: no difference written, none explained
    same = CrossCoder.create(D, 4 * D, k=4 * D)
    with torch.no_grad():
        same.load_state_dict(exact.state_dict())
        dec_MFD = same.W_dec.view(4 * D, 2, D)
        dec_MFD[:, 1] = dec_MFD[:, 0] + dec_MFD[:, 1]
        dec_MFD[:, 0] = dec_MFD[:, 1]
    assert difference_explained(same, [x_N2D]) <= 0.0
    # identical models: nothing to explain
    assert math.isnan(difference_explained(exact, [torch.cat([base_ND, base_ND], dim=1)]))


def test_format_round_trip_and_raw_reconstruction(tmp_path):
    torch.manual_seed(0)
    cc = CrossCoder.create(D, 16, k=2, metadata={"hook_name": "h"})
    with torch.no_grad():
        for p in cc.parameters():
            p.copy_(torch.randn_like(p))
        cc.threshold.fill_(0.7)
        cc.scales_M.copy_(torch.tensor([2.0, 0.5]))
    back = load_crosscoder(save_crosscoder(cc, tmp_path / "cc"))
    for name, t in cc.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    base, chat = torch.randn(5, D), torch.randn(5, D)
    x_hat = back.reconstruct_raw(base, chat)
    f = torch.relu(torch.cat([2 * base, 0.5 * chat], -1) @ cc.W_enc + cc.b_enc)
    f = f * (f * cc.decoder_norms_MF().sum(0) > 0.7)
    expect = (f @ cc.W_dec + cc.b_dec).view(5, 2, D) / torch.tensor([2.0, 0.5]).view(1, 2, 1)
    assert torch.allclose(x_hat, expect, atol=1e-5)
    (tmp_path / "cc" / "cfg.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_crosscoder(tmp_path / "cc")


def _cfg(**kw):
    kw = {"device": "cpu", **kw}  # None would mean CUDA when available: these tests mean the CPU
    train = TrainConfig(arch="batchtopk", d_sae=32, k=2, lr=3e-3, total_tokens=128 * 40, batch_size=128, log_every_steps=5,
                        checkpoint_every_tokens=128 * 10, dead_window_tokens=1024, num_threads=1, **kw)
    return CrosscoderConfig(train=train, buffer_tokens=512, eval_tokens=512)


class _Crash(Exception):
    pass


def _crashing_at(n, monkeypatch):
    """Make crosscoder_run's paired stream raise _Crash at its n-th batch of a call."""
    real = crosscoder_run.paired_factory

    def crashing(*args, **kwargs):
        make = real(*args, **kwargs)

        def source(start):
            for i, x in enumerate(make(start)):
                if i == n:
                    raise _Crash
                yield x
        return source

    monkeypatch.setattr(crosscoder_run, "paired_factory", crashing)
    return real


def _same_weights(dir_a, dir_b, atol=1e-5):
    a, b = load_crosscoder(dir_a), load_crosscoder(dir_b)
    for name, t in a.state_dict().items():
        assert torch.allclose(t, b.state_dict()[name], atol=atol), name


def _interrupt(pair, out, monkeypatch, cfg=None) -> None:
    """A run of `cfg` (default `_cfg()`) in `out` killed at step 25, after its step-20
    checkpoint; the data stream is restored afterwards, so the next call resumes."""
    real = _crashing_at(25, monkeypatch)
    with pytest.raises(_Crash):
        train_crosscoder(cfg or _cfg(), pair, out)
    monkeypatch.setattr(crosscoder_run, "paired_factory", real)


def test_interrupted_run_resumes_to_the_uninterrupted_result(caches, monkeypatch):
    b, c, tmp = caches
    pair = open_pair(b, c)
    whole = train_crosscoder(_cfg(), pair, tmp / "whole")
    _interrupt(pair, tmp / "killed", monkeypatch)
    assert not (tmp / "killed" / "run.json").exists()
    with pytest.raises(UserError, match="checkpoints of a crosscoder run with a different config"):
        train_crosscoder(CrosscoderConfig(_cfg().train, buffer_tokens=256, eval_tokens=512),  # another stream
                         pair, tmp / "killed")
    resumed = train_crosscoder(_cfg(), pair, tmp / "killed")
    assert resumed.resumed_from_step == 20
    _same_weights(whole.crosscoder_dir, resumed.crosscoder_dir)
    log_steps = lambda run: ckpt.read_log(tmp / run / "training_log").column("step").to_pylist()  # noqa: E731
    assert log_steps("killed") == log_steps("whole")
    assert train_crosscoder(_cfg(), pair, tmp / "killed").skipped
    with pytest.raises(UserError, match="different config"):
        train_crosscoder(_cfg(seed=1), pair, tmp / "killed")


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_checkpoint_of_a_cuda_run_resumes_on_the_cpu(caches, monkeypatch):
    # A run started on a GPU: its checkpoints and run.json record device "cuda" (the tensors
    # themselves are stored device-free). Resumed with device="cpu", the checkpoint's tensors
    # are loaded onto the CPU and the run ends where an uninterrupted CPU run ends.
    b, c, tmp = caches
    pair = open_pair(b, c)
    whole = train_crosscoder(_cfg(), pair, tmp / "whole")
    _interrupt(pair, tmp / "gpu", monkeypatch)
    newest = ckpt.list_checkpoints(tmp / "gpu" / "checkpoints")[-1]

    def on_cuda(state):
        state["config"]["device"] = "cuda"
        state["run_config"]["train"]["device"] = "cuda"
    _edit_json(newest / "state.json", on_cuda)

    loads = []
    real_load = ckpt.load_checkpoint

    def spy(path, device=None):  # None: the driver named no device
        loads.append(device and torch.device(device))
        return real_load(path, device or "cpu")
    monkeypatch.setattr(ckpt, "load_checkpoint", spy)
    resumed = train_crosscoder(_cfg(device="cpu"), pair, tmp / "gpu")
    assert resumed.resumed_from_step == 20 and loads == [torch.device("cpu")]
    _same_weights(whole.crosscoder_dir, resumed.crosscoder_dir)
    assert json.loads(resumed.run_json.read_text())["numerics"]["device"] == "cpu"
    # a finished run recorded on "cuda" is found complete on the CPU, and not retrained
    _edit_json(resumed.run_json, lambda m: m["config"]["train"].update(device="cuda"))
    again = train_crosscoder(_cfg(device="cpu", dtype="bfloat16"), pair, tmp / "gpu")
    assert again.skipped and again.metrics == resumed.metrics


def test_resume_loads_the_checkpoint_onto_the_runs_device(tmp_path, monkeypatch):
    # the driver passes the run's own device to the checkpoint reader (its map_location), and
    # the reader places the tensors there
    import dataclasses as dc

    from sae_transfer.training.run import train_sae
    from sae_transfer.training.sources import in_memory_factory

    acts = torch.randn(2048, D)
    cfg = TrainConfig(arch="topk", k=2, d_sae=16, total_tokens=256 * 6, batch_size=256, checkpoint_every_tokens=256 * 2,
                      scale_estimate_tokens=256, device="cpu")

    def stop_after_3(start):
        for i, x in enumerate(in_memory_factory(acts, 256)(start), start=start):
            if i == 3:
                raise _Crash
            yield x
    with pytest.raises(_Crash):
        train_sae(cfg, stop_after_3, D, tmp_path / "run", progress=False)
    asked, placed = [], []
    real_load, real_load_file = ckpt.load_checkpoint, ckpt.load_file

    def load_checkpoint(path, device=None):  # None: the driver named no device
        asked.append(device and torch.device(device))
        return real_load(path, device or "cpu")

    def load_file(path, device=None):  # None: the reader named no device
        placed.append(device)
        return real_load_file(path, device=device or "cpu")
    monkeypatch.setattr(ckpt, "load_checkpoint", load_checkpoint)
    monkeypatch.setattr(ckpt, "load_file", load_file)
    resumed = train_sae(dc.replace(cfg, num_threads=1), in_memory_factory(acts, 256), D, tmp_path / "run", progress=False)
    assert resumed.resumed_from_step == 2
    assert asked == [torch.device("cpu")] and placed == ["cpu"] * 3


def test_one_run_driver_reads_manifests_and_writes_checkpoints():
    import inspect

    from sae_transfer.training import run as sae_run

    sources = {m.__name__: inspect.getsource(m) for m in (sae_run, crosscoder_run)}
    defs = [name for name, src in sources.items()
            for _ in range(src.count("def _read_manifest") + src.count("def read_manifest"))]
    assert defs == ["sae_transfer.training.run"]
    cc_src = sources["sae_transfer.diffing.crosscoder_run"]
    assert "from sae_transfer.training.run import _" not in cc_src and "_write_checkpoint" not in cc_src
    assert "latest_checkpoint" not in cc_src and "write_json_atomic" not in cc_src  # the driver's job
    assert crosscoder_run.train_crosscoder.__code__.co_names.count("drive_run") == 1


def test_crosscoder_folder_storage_knows_no_science():
    import ast
    import inspect

    from sae_transfer.storage import crosscoder_format

    tree = ast.parse(inspect.getsource(crosscoder_format))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    ours = [m for m in imported if m and m.startswith("sae_transfer")]
    assert all(m.startswith("sae_transfer.storage") or m == "sae_transfer.errors" for m in ours), ours


@pytest.mark.cuda
@pytest.mark.parametrize("first,second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_cuda_crosscoder_checkpoint_resumes_on_the_other_device(caches, monkeypatch, first, second):
    b, c, tmp = caches
    pair = open_pair(b, c)
    whole = train_crosscoder(_cfg(tf32=False), pair, tmp / "whole")
    _interrupt(pair, tmp / "cut", monkeypatch, _cfg(device=first, tf32=False))
    resumed = train_crosscoder(_cfg(device=second, tf32=False), pair, tmp / "cut")
    assert resumed.resumed_from_step == 20
    assert json.loads(resumed.run_json.read_text())["numerics"]["device"].startswith(second)
    _same_weights(whole.crosscoder_dir, resumed.crosscoder_dir, atol=1e-3)


def test_latent_scaling_recovers_a_hand_set_beta():
    gen = torch.Generator().manual_seed(0)
    q_DL, _ = torch.linalg.qr(torch.randn(D, 3, generator=gen, dtype=torch.float64))
    d_LD = q_DL.T * torch.tensor([[0.5], [2.0], [1.0]], dtype=torch.float64)  # orthogonal, unequal norms
    f_NL = torch.rand(1000, 3, generator=gen, dtype=torch.float64) * (torch.rand(1000, 3, generator=gen) < 0.3)
    noise_ND = torch.randn(1000, D, generator=gen, dtype=torch.float64)
    noise_ND = noise_ND - noise_ND @ q_DL @ q_DL.T  # orthogonal to every direction
    y_ND = 2.0 * f_NL[:, :1] * d_LD[0] - 0.5 * f_NL[:, 1:2] * d_LD[1] + 0.3 * f_NL[:, 2:3] * d_LD[2] + noise_ND
    scaler = LatentScaler(d_LD)
    for i in range(0, 1000, 128):  # streamed in uneven batches
        scaler.update(f_NL[i:i + 128], y_ND[i:i + 128])
    beta = scaler.beta()
    assert beta[0] == pytest.approx(2.0, abs=1e-9) and beta[1] == pytest.approx(-0.5, abs=1e-9)
    assert beta[2] == pytest.approx(0.3, abs=1e-9)
    # with a non-orthogonal target, β is the one-column least-squares fit (independent solver)
    y2_ND = y_ND + torch.randn(1000, D, generator=gen, dtype=torch.float64)
    s2 = LatentScaler(d_LD)
    s2.update(f_NL, y2_ND)
    lstsq = torch.linalg.lstsq((f_NL[:, 2:3, None] * d_LD[2]).reshape(-1, 1), y2_ND.reshape(-1, 1)).solution
    assert float(s2.beta()[2]) == pytest.approx(float(lstsq), rel=1e-9)
    # the "own contribution added back" term equals materialising y_j = y + f_j·own_j per latent
    own_LD = torch.randn(3, D, generator=gen, dtype=torch.float64)
    with_own = LatentScaler(d_LD)
    with_own.update(f_NL, y_ND, own_LD=own_LD)
    for j in range(3):
        one = LatentScaler(d_LD[j:j + 1])
        one.update(f_NL[:, j:j + 1], y_ND + f_NL[:, j:j + 1] * own_LD[j])
        assert float(with_own.beta()[j]) == pytest.approx(float(one.beta()[0]), rel=1e-9)


def test_sae_latent_scaling_is_one_for_its_own_exact_reconstruction():
    sae = make_sae(SAEConfig("standard", D, 4, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(D)[:4] * 2)
        sae.W_enc.copy_(torch.eye(D)[:, :4] / 2)
    x_ND = torch.zeros(64, D)
    x_ND[:, :4] = torch.rand(64, 4)  # exactly reconstructed: error 0, so ε_j = f_j d_j
    out = sae_scaling(sae, [x_ND[:32], x_ND[32:]], torch.arange(4))
    assert torch.allclose(out.beta_error_L, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(out.beta_activation_L, torch.ones(4, dtype=torch.float64))


def test_cli_trains_from_two_caches_and_errors_in_one_line(caches, capsys):
    import subprocess
    import sys

    from typer.testing import CliRunner

    from sae_transfer.cli import app

    b, c, tmp = caches
    result = CliRunner().invoke(app, ["crosscoder", "--base-acts", str(b), "--chat-acts", str(c), "--out", str(tmp / "cli"),
                                      "--d-sae", "32", "--k", "2", "--tokens", "2048", "--batch-size", "256",
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert load_crosscoder(result.output.strip().splitlines()[-1]).d_sae == 32
    proc = subprocess.run([sys.executable, "-c",
                           "import sys; from sae_transfer.cli import main; sys.argv[0] = 'sae-transfer'; main()",
                           "crosscoder", "--out", str(tmp / "x"), "--d-sae", "8",
                           "--tokens", "1k", "--base-acts", str(b)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--chat-acts" in proc.stderr, proc.stderr


class _DeviceTensor(torch.Tensor):
    """A tensor that behaves as if it lived on a GPU: `.numpy()` refuses until `.cpu()`."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def test_crosscoder_tables_bring_a_device_crosscoders_table_to_the_host(caches, monkeypatch):
    import dataclasses

    from sae_transfer.diffing import stage

    b, c, tmp = caches
    pair = open_pair(b, c)
    result = train_crosscoder(_cfg(), pair, tmp / "run")

    def on_device(cc, *args):
        table = latent_table(cc, *args)
        tensors = [f.name for f in dataclasses.fields(table) if isinstance(getattr(table, f.name), torch.Tensor)]
        return dataclasses.replace(table, **{name: getattr(table, name).as_subclass(_DeviceTensor) for name in tensors})

    monkeypatch.setattr(stage, "latent_table", on_device)
    plan = stage.DiffingPlan(stats_tokens=512, batch_tokens=256, device="cpu")
    out = stage.crosscoder_tables(result.crosscoder_dir, pair, plan, "cc")
    latents = out["crosscoder_latents"][0]
    assert latents.num_rows == 32 and latents.column("rho").null_count == 0
    assert 0 < latents.column("diff_explained")[0].as_py() <= 1  # the caches differ, and it learnt some of it
    fired_chat_only = sum(k == "chat_only" and n > 0 for k, n in zip(latents.column("latent_class").to_pylist(),
                                                                       latents.column("fire_count").to_pylist()))
    assert out["latent_scaling"][0].num_rows == fired_chat_only
