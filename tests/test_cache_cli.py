"""`sae-transfer cache` end to end: output, reuse, bad hooks, and resuming after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae_transfer.cli import main
from sae_transfer.errors import UserError
from sae_transfer.storage.activations import MANIFEST, PROGRESS, ActivationDataset
from tests._tiny import tiny_corpus_dir, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return tiny_model_dir(root, d_model=32, n_layers=2), tiny_corpus_dir(root, n_copies=2)


def _args(model, corpus, out, tokens="2000", *extra):
    return ["sae-transfer", "cache", "--model", str(model), "--corpus", str(corpus), "--tokens", tokens,
            "--context-size", "40", "--out", str(out), "--hook", "blocks.0.hook_resid_pre",
            "--hook", "blocks.1.hook_resid_post", "-q", *extra]


def _run_main(monkeypatch, argv) -> int:
    monkeypatch.setattr(sys, "argv", argv)
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cache_prints_folders_then_reuses(setup, tmp_path, monkeypatch, capsys):
    model, corpus = setup
    assert _run_main(monkeypatch, _args(model, corpus, tmp_path, "2000", "--dtype", "float16")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith("written") for line in lines)
    paths = [Path(line.split("\t")[0]) for line in lines]
    assert paths[1].name.startswith("tiny-llama__blocks.1.hook_resid_post__train-2k__")
    ds = ActivationDataset(paths[1])
    assert ds.n_tokens == 2000 and ds.dtype == "float16" and ds.meta["prepend_bos"] is True
    assert _run_main(monkeypatch, _args(model, corpus, tmp_path, "2000", "--dtype", "float16")) == 0
    again = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in again] == [str(p) for p in paths]
    assert all("already complete, nothing to do" in line for line in again)


def test_bad_hook_is_a_one_line_error(setup, tmp_path, monkeypatch, capsys):
    model, corpus = setup
    argv = _args(model, corpus, tmp_path) + ["--hook", "blocks.1.hook_resid_pr"]
    assert _run_main(monkeypatch, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model has no hook 'blocks.1.hook_resid_pr'") and "blocks.1.hook_resid_pre" in err
    assert not list(tmp_path.iterdir())  # checked before anything was written
    with pytest.raises(UserError, match="split"):
        from sae_transfer.activations import CacheConfig, cache_activations
        from sae_transfer.corpus import CorpusConfig

        cache_activations(CacheConfig(model=str(model), hooks=("blocks.0.hook_resid_pre",), split="dev",
                                      corpus=CorpusConfig(source=str(corpus)), n_tokens=100), tmp_path / "x")


def test_killed_run_resumes_to_the_same_rows(setup, tmp_path, monkeypatch, capsys):
    model, corpus = setup
    # one 40-token sequence per forward pass and per shard: hundreds of fsynced shards, a slow run
    slow = ("--batch-tokens", "40", "--shard-size", "1")
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    code = "import sys; from sae_transfer.cli import main; sys.argv = sys.argv[1:]; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *_args(model, corpus, killed_out, "4000", *slow)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        progress = None
        while time.time() < deadline and proc.poll() is None:
            found = list(killed_out.glob(f"*hook_resid_post*/{PROGRESS}"))
            if found and len(found[0].read_text().splitlines()) >= 3:
                progress = found[0]
                break
            time.sleep(0.01)
        assert progress is not None and proc.poll() is None, "run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    folders = sorted(killed_out.iterdir())
    assert folders and not any((f / MANIFEST).exists() for f in folders)
    with pytest.raises(UserError, match="interrupted run"):
        ActivationDataset(folders[1])
    # resuming may batch differently: rows depend only on the sequence order
    assert _run_main(monkeypatch, _args(model, corpus, killed_out, "4000", "--batch-tokens", "800")) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out
    assert _run_main(monkeypatch, _args(model, corpus, clean_out, "4000", "--batch-tokens", "400")) == 0
    clean = sorted(Path(line.split("\t")[0]) for line in capsys.readouterr().out.strip().splitlines())
    assert [p.name for p in clean] == [f.name for f in folders]  # same content address
    for resumed_dir, clean_dir in zip(folders, clean):
        resumed, fresh = ActivationDataset(resumed_dir), ActivationDataset(clean_dir)
        assert resumed.n_tokens == fresh.n_tokens == 4000
        assert resumed.read_table().equals(fresh.read_table())
        assert not list(resumed_dir.glob("*.tmp")) and not (resumed_dir / PROGRESS).exists()
