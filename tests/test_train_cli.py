"""`sae-transfer train` / `finetune` end to end on tiny Parquet caches."""

import json

import pytest
import torch
from typer.testing import CliRunner

from sae_transfer.cli import app
from sae_transfer.errors import UserError
from sae_transfer.sae import metrics
from sae_transfer.sae.io import load_sae
from sae_transfer.storage import checkpoints as ckpt
from tests.test_training_loop import sparse_acts, write_cache

runner = CliRunner()


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = sparse_acts(6144, seed=0)
    chat = base.clone()
    chat[::50] *= 8  # chat-like outlier-norm tokens
    chat += 0.5 * torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(5)), dim=0)
    return root, write_cache(root / "base", base), write_cache(root / "chat", chat), chat


def _invoke(args):
    result = runner.invoke(app, args, catch_exceptions=True)
    return result


def test_train_then_finetune(caches):
    root, base, chat, chat_acts = caches
    out = root / "base-run"
    args = ["train", "--acts", str(base), "--arch", "relu", "--d-sae", "64", "--l1", "0.3", "--tokens", "7680",
            "--batch-size", "256", "--lr", "0.003", "--out", str(out), "--checkpoint-every", "5k", "--log-every", "10", "-q"]
    first = _invoke(args)
    assert first.exit_code == 0, first.output
    sae_dir = first.output.strip().splitlines()[-1]
    assert sae_dir == str(out / "sae")
    sae = load_sae(sae_dir, expect_d_in=16, expect_hook="blocks.1.hook_resid_pre")
    manifest = out / "run.json"
    stamp = manifest.stat().st_mtime_ns
    again = _invoke(args)
    assert again.exit_code == 0 and again.output.strip().splitlines()[-1] == sae_dir
    assert manifest.stat().st_mtime_ns == stamp  # a complete run is not redone

    ft_out = root / "ft-run"
    ft = _invoke(["finetune", "--sae", sae_dir, "--acts", str(chat), "--out", str(ft_out), "--tokens", "5120", "-q"])
    assert ft.exit_code == 0, ft.output
    record = json.loads((ft_out / "run.json").read_text())
    parent = json.loads(manifest.read_text())
    assert record["finetuned_from"]["path"] == str((out / "sae").resolve())
    assert len(record["finetuned_from"]["weights_sha256"]) == 64
    cfg = record["config"]
    assert cfg["batch_size"] == 256 and cfg["lr_warmup_frac"] == 0.05 and cfg["lr_decay_frac"] == 0.2
    assert cfg["l1_warmup_frac"] == 0.0 and cfg["lr"] == parent["config"]["lr"] == 0.003
    assert cfg["l1_coefficient"] == parent["config"]["l1_coefficient"]
    tuned = load_sae(ft_out / "sae")
    assert tuned.cfg.metadata["finetuned_from"] == str((out / "sae").resolve())
    x = chat_acts[:2048]
    with torch.no_grad():
        ev_base, ev_tuned = metrics.explained_variance(x, sae(x)), metrics.explained_variance(x, tuned(x))
    assert ev_tuned > ev_base
    assert ckpt.read_log(ft_out / "training_log").num_rows > 0


def test_bad_arguments_are_user_errors(caches):
    root, base, _, _ = caches
    bad_arch = _invoke(["train", "--acts", str(base), "--arch", "gated", "--d-sae", "8", "--tokens", "1k",
                        "--out", str(root / "x")])
    assert isinstance(bad_arch.exception, UserError) and "arch" in str(bad_arch.exception)
    missing = _invoke(["train", "--acts", str(root / "nope"), "--d-sae", "8", "--tokens", "1k", "--out", str(root / "y")])
    assert isinstance(missing.exception, UserError)
    not_sae = _invoke(["finetune", "--sae", str(root), "--acts", str(base), "--out", str(root / "z")])
    assert isinstance(not_sae.exception, UserError) and "SAE folder" in str(not_sae.exception)
