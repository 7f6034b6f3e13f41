"""The knobs of the offline demo base/chat pair, and where the pair lives on disk."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sae_transfer.chat_pairs import (
    CHAT_CONTEXT_SIZE,
    MAX_DOCSTRING_CHARS,
    WITH_SIGNATURE,
)

# Bump when the build code changes in a way that changes the checkpoints: it is part of the
# config hash, so a stale pair on disk is rebuilt instead of silently reused.
BUILD_VERSION = 1

DEFAULT_OUT = Path("artifacts/demo-models")
MANIFEST = "demo_pair.json"



@dataclass(frozen=True)
class DemoPairConfig:
    """Every size and step count of the demo pair (defaults: a few minutes on 2 CPU cores)."""

    seed: int = 0  # seeds initialisation, batch order and the corpus split
    eval_fraction: float = 0.1  # share of stdlib files held out (whole files) for evaluation
    max_docs: int | None = None  # cap on stdlib files read (None: all ~580); tests use a few
    vocab_size: int = 4096  # BPE vocabulary incl. special tokens; small keeps the unembed cheap
    d_model: int = 128  # residual width; 128 trains ~5k tokens/s per CPU core
    n_layers: int = 4  # blocks; the study hooks the middle one (blocks.2.hook_resid_pre)
    n_heads: int = 4  # attention heads (head dim 32)
    d_mlp: int = 384  # SwiGLU hidden width, ~3x d_model as in Llama
    context_size: int = 256  # tokens per pretraining sequence incl. BOS; = chat_context_size so the
    # base model has seen every position the chat data uses
    pretrain_steps: int = 480  # optimiser steps on the stdlib train split (~1M tokens, ~0.35 epoch)
    pretrain_batch: int = 8  # sequences per pretraining step (2048 tokens)
    pretrain_lr: float = 3e-3  # peak AdamW learning rate (linear warm-up, cosine decay)
    warmup_steps: int = 50  # linear learning-rate warm-up, for both stages
    weight_decay: float = 0.01  # AdamW weight decay on matrices
    chat_context_size: int = CHAT_CONTEXT_SIZE  # max tokens of one chat example (longer pairs are dropped)
    chat_steps: int = 200  # fine-tuning steps on instruction pairs (~0.85 epoch of ~3.8k pairs)
    chat_batch: int = 16  # chat examples per fine-tuning step
    chat_lr: float = 1e-3  # peak fine-tuning learning rate, lower than pretraining
    n_checkpoints: int = 4  # evenly spaced fine-tuning checkpoints kept (the last is the final model)
    max_docstring_chars: int = MAX_DOCSTRING_CHARS  # longer docstrings make poor prompts at this size
    with_signature: bool = WITH_SIGNATURE  # put `name(args)` in the user turn along with the docstring
    train_on_end: bool = True  # also train the <|end|> closing the answer, so rollouts stop
    eval_tokens: int = 65_536  # held-out stdlib tokens scored for the loss report
    eval_pairs: int = 128  # held-out instruction pairs scored for the chat-loss report
    n_rollouts: int = 3  # greedy chat rollouts on held-out docstrings in the report
    rollout_tokens: int = 96  # max new tokens per rollout
    num_threads: int | None = None  # torch CPU threads (None: one per idle core, see build.free_cores)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}: change either")
        for name in ("pretrain_steps", "chat_steps", "n_checkpoints", "pretrain_batch", "chat_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if min(self.context_size, self.chat_context_size) < 8:
            raise ValueError("context_size and chat_context_size must be at least 8 tokens")

    def hash(self) -> str:
        """sha256 (16 hex chars) of every knob but the thread count, plus BUILD_VERSION: the
        cache key of a build."""
        knobs = {k: v for k, v in asdict(self).items() if k != "num_threads"}  # speed, not result
        payload = json.dumps({"build_version": BUILD_VERSION, **knobs}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def middle_hook(self) -> str:
        """The residual-stream hook the default study uses: the input of the middle block."""
        return f"blocks.{self.n_layers // 2}.hook_resid_pre"


DEMO_HOOK = DemoPairConfig().middle_hook()  # "blocks.2.hook_resid_pre" for the default pair

# Named configs: "default" is the demo pair; "tiny" builds in seconds (2 layers, d_model 32,
# a dozen stdlib files) for smoke tests of the pipeline, never for results.
PRESETS: dict[str, DemoPairConfig] = {
    "default": DemoPairConfig(),
    "tiny": DemoPairConfig(
        max_docs=12, eval_fraction=0.3, vocab_size=400, d_model=32, n_layers=2, n_heads=2, d_mlp=64,
        context_size=128, pretrain_steps=12, pretrain_batch=4, warmup_steps=2, chat_context_size=128,
        chat_steps=8, chat_batch=4, eval_tokens=256, eval_pairs=4, n_rollouts=2, rollout_tokens=6, num_threads=1,
    ),
}


@dataclass(frozen=True)
class DemoPairPaths:
    """Where a built pair lives: `out/base`, `out/chat`, `out/chat-checkpoints/step-NNNNNN`."""

    out: Path

    @property
    def base(self) -> Path:
        return self.out / "base"

    @property
    def chat(self) -> Path:
        return self.out / "chat"

    @property
    def checkpoints(self) -> Path:
        return self.out / "chat-checkpoints"

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def checkpoint_dirs(self) -> list[Path]:
        """Existing fine-tuning checkpoints, in step order."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-"))


def demo_paths(out: str | Path = DEFAULT_OUT) -> DemoPairPaths:
    """Paths of the demo pair built under `out` (default `artifacts/demo-models`)."""
    return DemoPairPaths(Path(out))
