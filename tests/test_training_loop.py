"""The shared loop on the Parquet activation cache: every architecture trains; non-finite
activations or losses stop training with one clear error; kill -9 and resume matches."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_transfer.errors import UserError
from sae_transfer.storage import checkpoints as ckpt
from sae_transfer.training import TrainConfig
from sae_transfer.training.data import open_training_data
from sae_transfer.training.run import train_sae
from sae_transfer.training.sources import in_memory_factory

D = 16


def sparse_acts(n: int, d: int = D, n_feats: int = 48, seed: int = 0) -> torch.Tensor:
    """Sums of a few of n_feats fixed directions, plus an offset: an SAE can explain these."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_feats, d, generator=gen), dim=-1)
    codes = (torch.rand(n, n_feats, generator=gen) < 0.06) * torch.rand(n, n_feats, generator=gen) * 4
    return codes @ dirs + 2.0 + 0.01 * torch.randn(n, d, generator=gen)


def write_cache(path: Path, acts: torch.Tensor, seq_len: int = 32) -> Path:
    """A Parquet activation dataset holding `acts` (float32), written with the cache writer."""
    from sae_transfer.storage.activations_write import ActivationWriter, WriterConfig

    n = acts.shape[0]
    meta = {"model_id": "tiny-base", "hook": "blocks.1.hook_resid_pre", "d_model": acts.shape[1], "dtype": "float32",
            "n_tokens": n, "context_size": seq_len, "prepend_bos": True}
    writer = ActivationWriter(path, meta, WriterConfig(shard_bytes=1 << 18, row_group_rows=512))
    rows = np.arange(n)
    writer.append(rows // seq_len, (rows % seq_len).astype(np.int32), (rows % 100).astype(np.int32),
                  np.ones(n, dtype=np.uint8), acts.norm(dim=-1).numpy(), acts.contiguous().numpy().view(np.uint8))
    writer.finish()
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("acts") / "base", sparse_acts(8192))


@pytest.mark.parametrize("arch,extra", [
    # sparse_acts sits at a constant offset of 2 per dim, ~2× its spread: from a zero b_dec (relu's
    # default) 40 steps do not learn it, so start b_dec at the geometric median here
    ("relu", {"l1_coefficient": 0.3, "init_b_dec": "geometric_median"}),
    ("topk", {"k": 4}),
    ("batchtopk", {"k": 4}),
    ("jumprelu", {"l1_coefficient": 0.02, "jumprelu_init_threshold": 0.05, "jumprelu_bandwidth": 0.05}),
])
def test_every_architecture_trains_from_parquet(cache, tmp_path, arch, extra):
    cfg = TrainConfig(arch=arch, d_sae=64, total_tokens=256 * 40, batch_size=256, lr=3e-3, log_every_steps=10, device="cpu",
                      checkpoint_every_tokens=256 * 20, scale_estimate_tokens=2048, dead_window_tokens=4096, **extra)
    data = open_training_data(cache, cfg.batch_size, buffer_tokens=2048)
    result = train_sae(cfg, data.make_source, data.d_in, tmp_path / arch, metadata=data.metadata, progress=False)
    log = ckpt.read_log(tmp_path / arch / "training_log").to_pylist()
    assert [r["step"] for r in log] == [1, 11, 21, 31, 40]
    assert log[-1]["explained_variance"] > max(0.3, log[0]["explained_variance"] + 0.1), log
    assert log[-1]["l0"] > 0
    manifest = json.loads(result.run_json.read_text())
    assert manifest["status"] == "complete" and manifest["tokens"] == 256 * 40
    cfg_json = json.loads((result.sae_dir / "cfg.json").read_text())
    assert cfg_json["metadata"]["hook_name"] == "blocks.1.hook_resid_pre" and cfg_json["metadata"]["model_name"] == "tiny-base"
    assert (result.sae_dir / "sparsity.safetensors").is_file()


def test_nonfinite_activations_name_the_shard(tmp_path):
    acts = sparse_acts(2048)
    acts[1500, 3] = float("inf")
    path = write_cache(tmp_path / "bad", acts)
    cfg = TrainConfig(arch="topk", k=4, d_sae=32, total_tokens=2048, batch_size=256, scale_estimate_tokens=256,
                      device="cpu")
    data = open_training_data(path, 256, buffer_tokens=512)
    with pytest.raises(UserError, match="shard"):
        train_sae(cfg, data.make_source, D, tmp_path / "run", progress=False)


def test_nan_loss_names_the_step_and_keeps_checkpoint(tmp_path):
    acts = sparse_acts(4096)
    cfg = TrainConfig(arch="relu", d_sae=32, total_tokens=256 * 16, batch_size=256, checkpoint_every_tokens=256 * 4,
                      scale_estimate_tokens=512, device="cpu")

    def poisoned(start_batch):
        for i, x in enumerate(in_memory_factory(acts, 256)(start_batch), start=start_batch):
            yield x * float("inf") if i == 6 else x

    with pytest.raises(UserError, match="step 6"):
        train_sae(cfg, poisoned, D, tmp_path / "run", progress=False)
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last is not None and last.state["loop"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in last.sae_tensors.values())
    assert not (tmp_path / "run" / "run.json").exists()


RESUME_SCRIPT = """
import sys, time, torch
from safetensors.torch import load_file
from sae_transfer.training import TrainConfig
from sae_transfer.training.run import train_sae
from sae_transfer.training.sources import in_memory_factory
torch.set_num_threads(1)
acts = load_file(sys.argv[1])["acts"]
slow = float(sys.argv[3])
cfg = TrainConfig(arch="relu", d_sae=64, total_tokens=128 * 80, batch_size=128, lr=3e-3, log_every_steps=5,
                  checkpoint_every_tokens=128 * 10, scale_estimate_tokens=512, dead_window_tokens=1024,
                  resample_every_steps=25, lr_warmup_frac=0.1, device="cpu")
def source(start):
    for x in in_memory_factory(acts, 128)(start):
        time.sleep(slow)
        yield x
train_sae(cfg, source, acts.shape[1], sys.argv[2], progress=False)
"""


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    acts_path = tmp_path / "acts.safetensors"
    save_file({"acts": sparse_acts(4096)}, str(acts_path))
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = lambda out, slow: [sys.executable, str(script), str(acts_path), str(out), str(slow)]  # noqa: E731
    subprocess.run(run(tmp_path / "whole", 0), check=True, env=env, timeout=120)

    proc = subprocess.Popen(run(tmp_path / "killed", 0.02), env=env)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 60
    while time.time() < deadline and not ckpt.list_checkpoints(ckpts):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.list_checkpoints(ckpts), "no checkpoint appeared"
    assert not (tmp_path / "killed" / "run.json").exists(), "the run finished before it was killed"
    subprocess.run(run(tmp_path / "killed", 0), check=True, env=env, timeout=120)

    whole = load_file(str(tmp_path / "whole" / "sae" / "sae_weights.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "sae" / "sae_weights.safetensors"))
    for key in whole:
        assert torch.allclose(whole[key], resumed[key], atol=1e-6, rtol=0), key
    log_whole = ckpt.read_log(tmp_path / "whole" / "training_log").column("step").to_pylist()
    log_resumed = ckpt.read_log(tmp_path / "killed" / "training_log").column("step").to_pylist()
    assert log_whole == log_resumed
    # 50 is past resample_until_frac (0.6 × 80 steps)
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["resample_steps"] == [25]
