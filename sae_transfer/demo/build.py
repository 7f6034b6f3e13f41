"""Build (or find already built) the offline demo base/chat pair under one folder.

Layout: `base/`, `chat/` and `chat-checkpoints/step-NNNNNN/` are Hugging Face checkpoint
folders; `demo_pair.json` is written last and holds the config hash and the build report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sae_transfer.demo.chat import (
    assistant_loss,
    encode_pairs,
    finetune_chat,
    greedy_rollout,
    instruction_pairs,
)
from sae_transfer.demo.config import BUILD_VERSION, DEFAULT_OUT, DemoPairConfig, DemoPairPaths, demo_paths
from sae_transfer.demo.loop import mean_token_loss
from sae_transfer.demo.pretrain import build_tokenizer, pretrain, stdlib_corpus
from sae_transfer.demo.tokenizer import special_ids
from sae_transfer.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DemoPairReport:
    """What a build produced and how well the two models do on held-out data (nats per token)."""

    out: str  # folder holding base/, chat/, chat-checkpoints/ and the manifest
    config_hash: str  # DemoPairConfig.hash() of the build
    hook: str  # the default study hook (middle block's resid_pre)
    skipped: bool = False  # True when a matching build was already on disk
    build_seconds: float = 0.0  # wall time of the build that produced the folder
    n_params: int = 0  # parameters per model (tied embeddings counted once)
    train_tokens: int = 0  # tokens in the packed stdlib train split
    pretrain_tokens_seen: int = 0  # tokens the base model was trained on
    n_pairs: dict[str, int] = field(default_factory=dict)  # instruction pairs that fit, per split
    checkpoint_steps: list[int] = field(default_factory=list)  # saved fine-tuning steps
    losses: dict[str, float] = field(default_factory=dict)  # held-out losses, see `_evaluate`
    rollouts: list[dict[str, str]] = field(default_factory=list)  # prompt, reference, chat answer


def checkpoint_steps(cfg: DemoPairConfig) -> list[int]:
    """`n_checkpoints` evenly spaced fine-tuning steps, the last being the final step."""
    n = max(1, min(cfg.n_checkpoints, cfg.chat_steps))
    return sorted({round(cfg.chat_steps * (k + 1) / n) for k in range(n)})


def save_checkpoint(model: torch.nn.Module, tokenizer, dest: Path) -> None:
    """Save model + tokenizer as a Hugging Face folder at `dest`, atomically (temp + rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # transformers 5 writes its own backend class name; the generic fast class loads everywhere.
    config_path = tmp / "tokenizer_config.json"
    tok_cfg = json.loads(config_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_cfg, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def free_cores() -> int:
    """CPU cores not already busy (1-minute load average), at least one.

    On a small shared machine a second intra-op thread that has to wait for a busy core
    makes every step many times slower, so busy cores are left alone.
    """
    cores = os.cpu_count() or 1
    try:
        busy = math.ceil(os.getloadavg()[0] - 0.1)
    except OSError:  # not available on every platform
        busy = 0
    return max(1, min(cores, cores - busy))


def read_manifest(out: str | Path = DEFAULT_OUT) -> dict | None:
    """The manifest of the pair under `out`, or None if there is no complete build."""
    path = demo_paths(out).manifest
    return json.loads(path.read_text()) if path.is_file() else None


def _is_built(paths: DemoPairPaths, cfg: DemoPairConfig) -> dict | None:
    manifest = read_manifest(paths.out)
    if manifest is None or manifest.get("config_hash") != cfg.hash():
        return None
    if not ((paths.base / "config.json").is_file() and (paths.chat / "config.json").is_file()):
        return None
    return manifest


def build_demo_pair(
    out: str | Path = DEFAULT_OUT, cfg: DemoPairConfig = DemoPairConfig(), *, force: bool = False, progress: bool = True
) -> DemoPairReport:
    """Pretrain the base model, fine-tune the chat model, save both plus checkpoints under `out`.

    Returns the build report. When `out` already holds a build of the same config (manifest
    hash matches) nothing is trained and the stored report comes back with `skipped=True`.
    """
    paths = demo_paths(out)
    manifest = None if force else _is_built(paths, cfg)
    if manifest is not None:
        return DemoPairReport(**{**manifest["report"], "skipped": True})
    started = time.perf_counter()
    paths.out.mkdir(parents=True, exist_ok=True)
    paths.manifest.unlink(missing_ok=True)
    shutil.rmtree(paths.checkpoints, ignore_errors=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads or free_cores())
    log.info("building the demo pair with %d torch threads", torch.get_num_threads())
    try:
        report = _build(paths, cfg, progress)
    finally:
        torch.set_num_threads(threads_before)
    report.build_seconds = round(time.perf_counter() - started, 1)
    _write_manifest(paths, cfg, report)
    return report


def _build(paths: DemoPairPaths, cfg: DemoPairConfig, progress: bool) -> DemoPairReport:
    corpus = stdlib_corpus(cfg)
    tokenizer = build_tokenizer(cfg, corpus)
    base = pretrain(cfg, tokenizer, corpus, progress=progress)
    save_checkpoint(base.model, tokenizer, paths.base)
    train_pairs = instruction_pairs("train", cfg, corpus)
    eval_pairs = instruction_pairs("eval", cfg, corpus)
    train_enc = encode_pairs(tokenizer, train_pairs, cfg)
    eval_enc = encode_pairs(tokenizer, eval_pairs, cfg)[: cfg.eval_pairs]
    if not eval_enc:
        raise UserError("no held-out instruction pairs fit in chat_context_size: raise it or eval_fraction")
    losses = {
        "unigram_heldout": base.unigram_loss,
        "base_heldout": base.eval_loss,
        "base_assistant_heldout": assistant_loss(base.model, eval_enc, tokenizer.pad_token_id),
    }
    chat = base.model  # fine-tuned in place; the base weights are already on disk
    chat.generation_config.eos_token_id = [special_ids(tokenizer)["end"], tokenizer.eos_token_id]
    chat.generation_config.pad_token_id = tokenizer.pad_token_id
    steps = checkpoint_steps(cfg)

    def on_step(step: int, model: torch.nn.Module) -> None:
        if step in steps:
            save_checkpoint(model, tokenizer, paths.checkpoint(step))

    finetune_chat(cfg, chat, tokenizer, train_enc, on_step=on_step, progress=progress)
    save_checkpoint(chat, tokenizer, paths.chat)
    losses["chat_heldout"] = mean_token_loss(chat, base.eval_ids_NS, base.eval_ids_NS)
    losses["chat_assistant_heldout"] = assistant_loss(chat, eval_enc, tokenizer.pad_token_id)
    rollouts = [
        {"prompt": p.prompt, "reference": p.response, "chat": greedy_rollout(chat, tokenizer, p.prompt, cfg.rollout_tokens)}
        for p in _rollout_pairs(eval_pairs, cfg)
    ]
    return DemoPairReport(
        out=str(paths.out), config_hash=cfg.hash(), hook=cfg.middle_hook(),
        n_params=sum(p.numel() for p in chat.parameters()), train_tokens=base.train_tokens,
        pretrain_tokens_seen=base.tokens_seen, n_pairs={"train": len(train_enc), "eval": len(eval_enc)},
        checkpoint_steps=steps, losses={k: round(v, 4) for k, v in losses.items()}, rollouts=rollouts,
    )


def _rollout_pairs(pairs: list, cfg: DemoPairConfig) -> list:
    """Held-out pairs for the report's rollouts: short prompts, spread over the held-out files."""
    short = [p for p in pairs if len(p.prompt) <= 200]
    if not short:
        short = pairs
    stride = max(1, len(short) // max(1, cfg.n_rollouts))
    return short[::stride][: cfg.n_rollouts]


def _write_manifest(paths: DemoPairPaths, cfg: DemoPairConfig, report: DemoPairReport) -> None:
    """The manifest goes last, atomically: its presence means the whole pair is on disk."""
    manifest = {
        "build_version": BUILD_VERSION,
        "config_hash": cfg.hash(),
        "config": asdict(cfg),
        "base": paths.base.name,
        "chat": paths.chat.name,
        "checkpoints": [paths.checkpoint(s).relative_to(paths.out).as_posix() for s in report.checkpoint_steps],
        "report": asdict(report),
    }
    tmp = paths.manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.rename(paths.manifest)
