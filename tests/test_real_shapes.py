"""The whole study, live SAE sources, on a random pair with Qwen1.5-0.5B's real widths and vocabulary.

Two blocks instead of 24 keep it CPU-sized; every width stays real: d_model 1024, MLP 2816, 16 heads,
151,936-token vocabulary (so logits, embeddings and the unembedding are the real size), and SAEs of
32 x 1024 = 32,768 latents, the study's Qwen width. Token budgets are a few thousand per step. The
test catches code that assumes the demo pair's sizes (a small vocabulary, narrow SAEs, a BOS token).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from sae_transfer.storage import catalog
from sae_transfer.study import parse_study
from tests._qwen_shape import D_MODEL, qwen_shape_pair
from tests._tiny import tiny_corpus_dir

pytestmark = [pytest.mark.slow, pytest.mark.real_size]  # opt-in: make test-real-size

HOOK = "blocks.1.hook_resid_pre"
EXPANSION = 32  # 32 x 1024 = 32768 latents, as the study's Qwen SAEs


class _PeakRSS:
    """Samples the resident memory of this process and its children (the flow's workers) every 0.2 s."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.wait(0.2):
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _config(tmp_path: Path):
    base, chat = qwen_shape_pair(tmp_path / "pair")
    return parse_study({
        "name": "qwen-shape",
        "results_root": str(tmp_path / "results"),
        "pair": {"base": str(base), "chat": str(chat), "checkpoints": None, "build_demo": False},
        "hooks": [HOOK],
        "corpus": {"source": str(tiny_corpus_dir(tmp_path)), "context_size": 64, "train_tokens": 4096},
        "sae": {"source": "live", "expansion": EXPANSION, "train_tokens": 2048, "batch_size": 512,
                "buffer_tokens": 1024, "l1_coefficient": 1.0},
        "finetune": {"tokens": 512, "batch_size": 256},
        "eval": {"tokens": 512, "batch_tokens": 128, "bootstrap": 20, "position_multiples": [1, 2]},
        "instructions": {"n_prompts": 2, "max_new_tokens": 4},
        "diffing": {"tokens": 1024, "crosscoder_expansion": 2, "crosscoder_k": 8, "crosscoder_tokens": 1024,
                    "stats_tokens": 1024, "examples_k": 2, "top_latents": 2, "checkpoint_finetune_tokens": 0},
        "device": "cpu",
    })


def test_study_runs_end_to_end_at_qwen_widths(tmp_path, prefect_harness):
    from sae_transfer.flows.study import transfer_study

    cfg = _config(tmp_path)
    start = time.perf_counter()
    with _PeakRSS() as rss:
        transfer_study(cfg)
    print(f"\nqwen-shape study: {time.perf_counter() - start:.0f} s, peak RSS (process tree) {rss.peak / 2**30:.1f} GiB")

    cfgs = [json.loads(p.read_text()) for p in Path(cfg.results_dir, "saes").rglob("sae/cfg.json")]
    assert len(cfgs) == 3, cfgs  # base, chat and fine-tuned base (the crosscoder's cfg.json lies in crosscoder/)
    for c in cfgs:
        assert (c["d_in"], c["d_sae"]) == (D_MODEL, EXPANSION * D_MODEL), c
    count = lambda sql: int(catalog.query(cfg.results_dir, sql).iloc[0, 0])  # noqa: E731
    assert count("select count(*) from metrics where segment = 'text'") == 12  # 3 SAEs x 2 models x 2 policies
    # the instruction segments (user prompt, rollout, template) of the ChatML transcripts
    assert count("select count(distinct segment) from metrics where segment <> 'text'") == 3
    for table in ("outliers", "positions", "rollouts", "latent_stats", "crosscoder_latents", "latent_ablation"):
        assert count(f"select count(*) from {table}") > 0, table
