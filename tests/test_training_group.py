"""Several SAEs from one live stream (sae_transfer.training.group): every hook and every swept
setting trains from the same forward passes, each SAE equal to the one trained alone, each run
folder resumable on its own."""

from __future__ import annotations

import json

import pytest
import torch

from sae_transfer.corpus import CorpusConfig
from sae_transfer.errors import UserError
from sae_transfer.models import load_model
from sae_transfer.sae.io import load_sae
from sae_transfer.training import group as group_mod
from sae_transfer.training.api import LiveRun, train_live, train_live_group
from sae_transfer.training.config import TrainConfig
from sae_transfer.training.live import open_live_stream
from tests._tiny import run_cli, tiny_corpus_dir, tiny_model_dir

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
S, N_TOKENS, BUFFER = 64, 8192, 1024


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    model_dir, corpus_dir = tiny_model_dir(root), tiny_corpus_dir(root)
    return {"root": root, "corpus": CorpusConfig(source=str(corpus_dir)), "model": load_model(str(model_dir), device="cpu"),
            "model_dir": model_dir}


def _cfg(**kw) -> TrainConfig:
    base = dict(arch="topk", d_sae=64, k=8, batch_size=128, total_tokens=128 * 40, checkpoint_every_tokens=128 * 20,
                scale_estimate_tokens=2048, log_every_steps=10, seed=0, device="cpu", lr=1e-3)
    return TrainConfig(**{**base, **kw})


def _runs(root, name) -> list[LiveRun]:
    """Two hooks x a sweep of k (and one relu): four SAEs."""
    return [LiveRun(HOOKS[0], _cfg(k=4), root / name / "h0-k4", variant="k=4"),
            LiveRun(HOOKS[0], _cfg(k=8), root / name / "h0-k8", variant="k=8"),
            LiveRun(HOOKS[1], _cfg(k=8), root / name / "h1-k8"),
            LiveRun(HOOKS[1], _cfg(arch="relu", l1_coefficient=1.0), root / name / "h1-relu", variant="arch=relu")]


def _group(setup, runs, **kw):
    return train_live_group(setup["model"], setup["corpus"], runs, context_size=S, buffer_tokens=BUFFER, **kw)


def _assert_same_weights(a, b, atol=0.0):
    wa, wb = load_sae(a).state_dict(), load_sae(b).state_dict()
    assert wa.keys() == wb.keys()
    for name, tensor in wa.items():
        if atol:
            torch.testing.assert_close(wb[name], tensor, atol=atol, rtol=0)
        else:
            assert torch.equal(wb[name], tensor), name


def test_multi_hook_stream_gives_each_hook_its_one_hook_batches_from_one_forward_pass(setup):
    def stream(hooks):
        return open_live_stream(setup["model"], hooks, setup["corpus"], 128, seed=2, buffer_tokens=BUFFER,
                                context_size=S, n_tokens=N_TOKENS).live

    both = stream(HOOKS)
    joint = [b for _, b in zip(range(30), both.batches(5))]
    for hook in HOOKS:
        alone = stream([hook])
        for i, (x, y) in enumerate(zip((b[hook] for b in joint), alone.source(5), strict=False)):
            assert torch.equal(x, y), (hook, i)
        # the two-hook stream ran no more tokens through the model than a one-hook stream does
        assert both.forward_tokens_run == alone.forward_tokens_run


def test_group_trains_each_sae_as_it_trains_alone_from_one_forward_pass(setup, monkeypatch):
    root = setup["root"]
    runs = _runs(root, "group")
    forwards = []
    real = group_mod.train_group

    def counting(members, batches, **kw):
        out = real(members, batches, **kw)
        forwards.append(batches.__self__.forward_tokens_run)
        return out

    monkeypatch.setattr("sae_transfer.training.api.train_group", counting)
    results = _group(setup, runs)
    assert [r.skipped for r in results] == [False] * 4
    # one pass over the 5,120 training tokens (+ the scale sample, from the same kept chunks)
    assert forwards[0] <= 128 * 40 + BUFFER

    for run, result in zip(runs, results):
        alone = train_live(setup["model"], run.hook, setup["corpus"], root / "alone" / run.out_dir.name, run.cfg,
                           context_size=S, buffer_tokens=BUFFER)
        _assert_same_weights(alone.sae_dir, result.sae_dir)
        meta = json.loads((result.sae_dir / "cfg.json").read_text())["metadata"]
        assert meta["hook_name"] == run.hook and meta.get("variant") == run.variant
        timings = json.loads(result.run_json.read_text())["timings"]
        assert timings["group_size"] == 4 and timings["group_batches"] == 40


def test_a_finished_group_is_reused_and_a_killed_one_resumes_to_the_same_weights(setup, monkeypatch):
    root = setup["root"]
    whole = _group(setup, _runs(root, "whole"))
    again = _group(setup, _runs(root, "whole"))
    assert all(r.skipped for r in again)

    class Crash(Exception):
        pass

    steps = {"n": 0}
    real_step = group_mod.Loop.step

    def crashing(self, raw_BD):
        steps["n"] += 1
        if steps["n"] > 4 * 25:  # every member past its checkpoint at step 20, killed at step 25
            raise Crash
        real_step(self, raw_BD)

    monkeypatch.setattr(group_mod.Loop, "step", crashing)
    with pytest.raises(Crash):
        _group(setup, _runs(root, "killed"))
    monkeypatch.setattr(group_mod.Loop, "step", real_step)
    resumed = _group(setup, _runs(root, "killed"))
    assert [r.resumed_from_step for r in resumed] == [20] * 4
    for a, b in zip(whole, resumed):
        _assert_same_weights(a.sae_dir, b.sae_dir, atol=1e-6)


def test_group_refuses_runs_that_cannot_share_a_stream(setup):
    root = setup["root"]
    runs = [LiveRun(HOOKS[0], _cfg(), root / "bad" / "a"), LiveRun(HOOKS[0], _cfg(batch_size=64), root / "bad" / "b")]
    with pytest.raises(UserError, match="share its batch_size"):
        _group(setup, runs)
    same = [LiveRun(HOOKS[0], _cfg(), root / "bad" / "a"), LiveRun(HOOKS[1], _cfg(k=4), root / "bad" / "a")]
    with pytest.raises(UserError, match="same folder"):
        _group(setup, same)


def _cli(monkeypatch, capsys, args):
    code, out, err = run_cli(monkeypatch, capsys, "train", *args)
    return code, out, err.strip()


def test_cli_trains_every_hook_and_sweep_value_from_one_stream(setup, monkeypatch, capsys):
    out_dir = setup["root"] / "cli"
    common = ["--model", str(setup["model_dir"]), "--corpus", setup["corpus"].source, "--context-size", str(S),
              "--buffer-tokens", "1024", "--arch", "topk", "--d-sae", "32", "--tokens", "1024", "--batch-size", "128",
              "--device", "cpu", "--out", str(out_dir), "-q"]
    code, out, err = _cli(monkeypatch, capsys, [*common, "--hook", HOOKS[0], "--hook", HOOKS[1], "--sweep", "k=2,4"])
    assert code in (0, None), err
    folders = out.strip().splitlines()
    assert len(folders) == 4 and len({f.rsplit("/", 2)[-2] for f in folders}) == 4
    ks = sorted(json.loads((out_dir / f.rsplit("/", 2)[-2] / "run.json").read_text())["config"]["k"] for f in folders)
    assert ks == [2, 2, 4, 4]

    for bad, words in ((["--sweep", "batch=1,2"], "write KEY=V1,V2"), (["--sweep", "k=two"], "int values"),
                       (["--sweep", "k=64"], "at most d_sae")):
        code, _, err = _cli(monkeypatch, capsys, [*common, "--hook", HOOKS[0], *bad])
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err


@pytest.mark.cuda
def test_group_on_the_gpu_keeps_its_stream_on_the_device_and_trains_as_alone(setup):
    """The multi-hook stream's batches and every member's weights live on the GPU; a member of a
    group trains what it trains alone there too."""
    model = load_model(str(setup["model_dir"]), device="cuda")
    stream = open_live_stream(model, HOOKS, setup["corpus"], 128, buffer_tokens=BUFFER, context_size=S, n_tokens=N_TOKENS)
    batch = next(iter(stream.live.batches(0)))
    assert all(b.device.type == "cuda" for b in batch.values())
    root = setup["root"] / "gpu"
    runs = [LiveRun(HOOKS[0], _cfg(device="cuda"), root / "a"), LiveRun(HOOKS[1], _cfg(device="cuda", k=4), root / "b")]
    results = train_live_group(model, setup["corpus"], runs, context_size=S, buffer_tokens=BUFFER)
    assert all(json.loads(r.run_json.read_text())["numerics"]["device"].startswith("cuda") for r in results)
    alone = train_live(model, HOOKS[1], setup["corpus"], root / "b-alone", runs[1].cfg, context_size=S, buffer_tokens=BUFFER)
    _assert_same_weights(alone.sae_dir, results[1].sae_dir, atol=1e-5)
