"""A seconds-sized study config on a tiny demo pair, for flow and deployment tests."""

from __future__ import annotations

from pathlib import Path

from sae_transfer.study import parse_study

HOOK = "blocks.1.hook_resid_pre"

# Seconds-sized budgets of every stage (also bench/bench_runners.py's tiny preset).
TINY_BUDGETS = {
    "corpus": {"context_size": 32, "train_tokens": 4096},
    "sae": {"expansion": 4, "train_tokens": 4096, "batch_size": 256, "l1_coefficient": 1.0},
    "finetune": {"tokens": 1024, "batch_size": 128},
    "eval": {"tokens": 512, "bootstrap": 50, "position_multiples": [1, 2]},
    "instructions": {"n_prompts": 2, "max_new_tokens": 6},
    "diffing": {"crosscoder_expansion": 2, "crosscoder_k": 4, "crosscoder_tokens": 2048, "stats_tokens": 2048,
                "examples_k": 2, "top_latents": 2, "checkpoint_finetune_tokens": 512},
}


def tiny_study(root: Path, name: str = "tiny") -> StudyConfig:  # noqa: F821
    """Study config writing under `root`: tiny pair (built on first use), small budgets."""
    pair = root / "pair"
    return parse_study({
        "name": name,
        "results_root": str(root / "results"),
        "pair": {"base": str(pair / "base"), "chat": str(pair / "chat"), "checkpoints": str(pair / "chat-checkpoints"),
                 "build_demo": True, "demo_preset": "tiny"},
        "hooks": [HOOK],
        **TINY_BUDGETS,
    })
