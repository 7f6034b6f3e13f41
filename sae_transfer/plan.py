"""What a study will cost before it runs: per DAG step, tokens, model tokens (tokens pushed through
a model, all passes counted), bytes on disk, peak device and host memory, FLOPs and an estimated
time, on the detected device and on a named GPU.

It reads only the models' configurations (`transformers.AutoConfig`, from a local folder, the Hub
cache or the Hub), never their weights, so it answers before a download. Pass `shapes` to plan
for models whose configuration cannot be fetched (e.g. offline).

The figures are estimates of the code as it is, not measurements:
- activation cache: tokens x d_model x bytes(act_dtype) per hook, plus ~8 B per row of
  compressed bookkeeping columns (seq_id, pos, token_id, role, norm);
- a forward pass costs 2 x params x tokens (attention's context-length term is left out); a cache
  or norm pass stops after the hook's block, so it costs only the blocks before the hook;
- an SAE (or crosscoder) step costs 6 x tokens x its weight count (forward 2, backward 4), i.e.
  12 x tokens x d_model x d_sae for an SAE; its memory is weights, gradients and two Adam states
  (16 B per weight) plus [B, d_sae] activations held three times in float32;
- an evaluation batch holds its logits three times in float32 (batch_tokens x vocab x 12 B);
- rollouts are memory-bound: one read of the weights per generated token per batch of 16.
Time = FLOPs / (rate x utilisation), with the rate a published dense figure for a named GPU
(bf16 for the models, TF32 for SAE training) or, elsewhere, a matmul timed once per call.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sae_transfer.errors import UserError
from sae_transfer.gpu_rates import GPU, GPUS, detect_device, measured_rate
from sae_transfer.model_shapes import ModelShape, study_shapes
from sae_transfer.storage.mirror import mirror_dir
from sae_transfer.storage.store import RemotePath, location
from sae_transfer.study import SAESection, StudyConfig

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ROW_OVERHEAD_BYTES = 8  # seq_id, pos, token_id, role, norm per cached row, ZSTD-compressed (measured ~5-8 B)
CACHE_BATCH_TOKENS = 16384  # CacheConfig.batch_tokens
WRITE_QUEUE = 3  # CacheConfig.write_queue
SHUFFLE_BUFFER_TOKENS = SAESection().buffer_tokens  # training data's shuffle buffer (one default for cache and live)
KEEP_CHECKPOINTS = 2  # TrainConfig.keep_checkpoints
ROLLOUT_BATCH = 16  # greedy_rollouts' batch size
PROMPT_TOKENS = 64  # assumed mean prompt length of an instruction, chat template included
UTILISATION = 0.4  # assumed fraction of a GPU's dense peak rate reached by forward passes and SAE steps
BANDWIDTH_UTILISATION = 0.6  # assumed fraction of peak memory bandwidth reached by decoding


@dataclass
class Step:
    """One planned DAG step."""

    step: str  # task name, e.g. cache-activations
    target: str  # which model / hook / SAE it is for
    tokens: int  # tokens read (cache rows, SAE training tokens, eval tokens)
    model_tokens: int  # tokens pushed through a language model, every pass counted
    disk_bytes: int  # bytes it leaves on disk
    device_bytes: int  # peak accelerator memory
    host_bytes: int  # peak host memory of the step's own buffers (beyond the model load)
    flops: float
    kind: str = "model"  # model (bf16 rate) or sae (TF32 rate) or decode (bandwidth-bound)
    decode_bytes: float = 0.0  # bytes read from device memory by memory-bound decoding
    cached: bool | None = None  # True: its output exists; None: not checked
    note: str = ""
    seconds: float = 0.0  # on the detected device
    gpu_seconds: float | None = None  # on the named GPU


@dataclass
class Plan:
    config: str
    shapes: dict[str, ModelShape]
    steps: list[Step]
    device: str
    gpu: str | None
    assumptions: dict = field(default_factory=dict)

    def totals(self) -> dict:
        todo = [s for s in self.steps if not s.cached]
        return {
            "total_disk_bytes": sum(s.disk_bytes for s in self.steps),
            "total_disk_bytes_to_write": sum(s.disk_bytes for s in todo),
            "cache_disk_bytes": sum(s.disk_bytes for s in self.steps if s.step == "cache-activations"),
            "peak_device_bytes": max((s.device_bytes for s in self.steps), default=0),
            "peak_host_bytes": max((s.host_bytes for s in self.steps), default=0),
            "total_flops": sum(s.flops for s in self.steps),
            "total_model_tokens": sum(s.model_tokens for s in self.steps),
            "total_seconds": sum(s.seconds for s in todo),
            "total_gpu_seconds": sum(s.gpu_seconds or 0.0 for s in todo) if self.gpu else None,
        }

    def to_dict(self) -> dict:
        return {"config": self.config, "device": self.device, "gpu": self.gpu,
                "models": {role: asdict(s) for role, s in self.shapes.items()},
                "assumptions": self.assumptions, "steps": [asdict(s) for s in self.steps], **self.totals()}


def hook_blocks(hook: str, n_layers: int) -> int:
    """Blocks a forward pass runs before `hook` fires (resid_pre of block i: i; elsewhere in block i: i + 1)."""
    m = re.match(r"blocks\.(\d+)\.(\w+)", hook)
    if not m:
        return n_layers
    i = int(m.group(1))
    return min(i if m.group(2) == "hook_resid_pre" else i + 1, n_layers)


def cache_bytes(tokens: int, d_model: int, act_dtype: str, n_hooks: int = 1) -> int:
    """Bytes on disk of `n_hooks` activation datasets of `tokens` rows each."""
    return n_hooks * tokens * (d_model * BYTES[act_dtype] + ROW_OVERHEAD_BYTES)


def sae_weights(d_model: int, d_sae: int) -> int:
    """Weights of an SAE: W_enc, W_dec and both biases."""
    return 2 * d_model * d_sae + d_sae + d_model


def _sae_train_step(step, target, d_in, d_sae, tokens, batch, n_checkpoints=KEEP_CHECKPOINTS, k=None) -> Step:
    w = sae_weights(d_in, d_sae)
    device = 16 * w + 3 * batch * d_sae * 4 + 4 * batch * d_in * 4
    disk = 4 * w + n_checkpoints * 3 * 4 * w + 4 * d_sae  # final SAE + checkpoints (weights, Adam m, v) + sparsity
    host = SHUFFLE_BUFFER_TOKENS * d_in * 4
    note = f"d_sae {d_sae}, batch {batch}, {math.ceil(tokens / batch)} steps"
    return Step(step, target, tokens, 0, disk, device, host, 6.0 * tokens * w, kind="sae", note=note)


def _forward_flops(shape: ModelShape, tokens: int, hook: str | None = None) -> float:
    """FLOPs of forwarding `tokens`: up to the hook's block only when `hook` is given."""
    if hook is None:
        return 2.0 * shape.forward_params * tokens
    return 2.0 * shape.block_params * hook_blocks(hook, shape.n_layers) * tokens


def _batch_activations(shape: ModelShape, batch_tokens: int, dtype: str) -> int:
    return batch_tokens * (4 * shape.d_model + 3 * max(shape.d_mlp, shape.d_model)) * BYTES[dtype]


def _cached_dataset(root: Path, spec: str, hook: str, tokens: int, cfg: StudyConfig, corpus: str) -> bool:
    """True when a complete activation dataset of this model, hook, split, budget, corpus and dtypes
    is under `root` (matched on its manifest; the model's weights are not hashed, so a local folder
    whose weights changed still counts, where the run itself would re-cache)."""
    from sae_transfer.storage.activations import is_complete, read_manifest

    if not root.is_dir():
        return False
    local = Path(spec).expanduser()
    model = local.resolve().name if local.is_dir() else spec.split("@")[0]
    want = {"model_id": model, "hook": hook, "split": "train", "n_tokens": tokens, "corpus": corpus,
            "context_size": cfg.corpus.context_size, "dtype": cfg.act_dtype, "model_dtype": cfg.dtype}
    for folder in root.iterdir():
        manifest = read_manifest(folder) if folder.is_dir() and is_complete(folder) else None
        m = dict((manifest or {}).get("meta") or {}, n_tokens=(manifest or {}).get("n_tokens"))
        if manifest and all(m.get(k) == v for k, v in want.items()):
            return True
    return False


FREE_FRACTION = 0.8  # the share of free disk 'auto' lets the caches take (SAE runs and tables need the rest)


def cache_pair_bytes(cfg: StudyConfig, shapes: dict[str, ModelShape]) -> int:
    """Bytes of both models' training caches (corpus.train_tokens at every hook)."""
    return sum(cache_bytes(cfg.corpus.train_tokens, shapes[r].d_model, cfg.act_dtype, len(cfg.hooks)) for r in ("base", "chat"))


def training_source(cfg: StudyConfig, shapes: dict[str, ModelShape]) -> str:
    """Where the study's SAEs train from: `sae.source`, with 'auto' resolved to 'cache' when both
    models' caches fit FREE_FRACTION of the results folder's free disk, else 'live'."""
    if cfg.sae.source != "auto":
        return cfg.sae.source
    return "cache" if cache_pair_bytes(cfg, shapes) <= FREE_FRACTION * free_bytes(cfg.results_dir) else "live"


def plan_steps(cfg: StudyConfig, shapes: dict[str, ModelShape]) -> list[Step]:
    """Every step the study's DAG submits, with its cost (see the module doc for the formulas)."""
    steps: list[Step] = []
    acts_root = cfg.results_dir / "activations"
    act_b, model_b = BYTES[cfg.act_dtype], BYTES[cfg.dtype]
    n_hooks = len(cfg.hooks)

    def caches(corpus: str, tokens: int, label: str) -> None:
        for role, spec in (("base", cfg.pair.base), ("chat", cfg.pair.chat)):
            s = shapes[role]
            deepest = max(cfg.hooks, key=lambda h: hook_blocks(h, s.n_layers))
            disk = cache_bytes(tokens, s.d_model, cfg.act_dtype, n_hooks)
            device = s.n_params * model_b + _batch_activations(s, CACHE_BATCH_TOKENS, cfg.dtype)
            host = (WRITE_QUEUE + 2) * CACHE_BATCH_TOKENS * s.d_model * act_b * n_hooks
            cached = all(_cached_dataset(acts_root, spec, h, tokens, cfg, corpus) for h in cfg.hooks)
            steps.append(Step("cache-activations", f"{role}{label}", tokens, tokens, disk, device, host,
                              _forward_flops(s, tokens, deepest), cached=cached,
                              note=f"{n_hooks} hook(s) x {s.d_model} x {act_b} B, {corpus}"))

    live = training_source(cfg, shapes) == "live"
    if not live:
        caches(cfg.corpus.source, cfg.corpus.train_tokens, "")
    ev, sae = cfg.eval, cfg.sae
    n_saes = 3 if cfg.finetune.enabled else 2
    logits = ev.batch_tokens * shapes["base"].vocab * 4 * 3
    variants = sae.variants()
    n_saes *= len(variants)
    for hook in cfg.hooks:
        for label, v in variants:
            tag = f" [{label}]" if label else ""
            for role in ("base", "chat"):
                d = shapes[role].d_model
                steps.append(_sae_train_step("train-sae", f"{role} {hook}{tag}", d, v.expansion * d, v.train_tokens,
                                             v.batch_size))
            if cfg.finetune.enabled:
                d = shapes["base"].d_model
                steps.append(_sae_train_step("finetune-sae", f"base->chat {hook}{tag}", d, v.expansion * d,
                                             cfg.finetune.tokens, cfg.finetune.batch_size))
        s = shapes["base"]
        steps.append(Step("pair-threshold", f"base {hook}", ev.tokens, ev.tokens, 0, s.n_params * model_b
                          + _batch_activations(s, ev.batch_tokens, cfg.dtype), 0, _forward_flops(s, ev.tokens, hook)))
        for role in ("base", "chat"):
            s = shapes[role]
            weights = s.n_params * model_b
            saes_b = n_saes * 4 * sae_weights(s.d_model, sae.expansion * s.d_model)
            steps.append(Step("outliers", f"{role} {hook}", ev.tokens, ev.tokens, ev.tokens * 16,
                              weights + _batch_activations(s, ev.batch_tokens, cfg.dtype), 0,
                              _forward_flops(s, ev.tokens, hook), note="one norm pass"))
            passes = 2 + n_saes * 2  # clean, zero ablation, then one spliced pass per SAE and outlier policy
            sae_flops = 4.0 * ev.tokens * n_saes * sae.expansion * s.d_model * s.d_model
            steps.append(Step("transfer", f"{role} {hook}", ev.tokens, passes * ev.tokens, 10_000,
                              weights + saes_b + logits + _batch_activations(s, ev.batch_tokens, cfg.dtype), 0,
                              passes * _forward_flops(s, ev.tokens) + sae_flops,
                              note=f"{passes} passes; logits {ev.batch_tokens} x {s.vocab} x 12 B"))
            sizes = [m for m in ev.position_multiples if s.max_positions is None
                     or m * cfg.corpus.context_size <= s.max_positions]
            steps.append(Step("positions", f"{role} {hook}", ev.tokens * len(sizes), ev.tokens * len(sizes), 10_000,
                              weights + saes_b + _batch_activations(s, ev.batch_tokens, cfg.dtype), 0,
                              len(sizes) * (_forward_flops(s, ev.tokens, hook) + sae_flops),
                              note=f"context x {', '.join(map(str, sizes))} (assumed eval.tokens each)"))
    chat = shapes["chat"]
    if cfg.instructions.enabled:
        ins = cfg.instructions
        seq = PROMPT_TOKENS + ins.max_new_tokens
        kv = ROLLOUT_BATCH * seq * chat.n_layers * 2 * chat.d_model * model_b  # upper bound (no grouped-query saving)
        steps.append(Step("rollouts", "chat", ins.n_prompts * seq, ins.n_prompts * seq, ins.n_prompts * seq * 8,
                          chat.n_params * model_b + kv, 0, 2.0 * chat.forward_params * ins.n_prompts * seq, kind="decode",
                          decode_bytes=math.ceil(ins.n_prompts / ROLLOUT_BATCH) * ins.max_new_tokens * chat.n_params * model_b,
                          note=f"{ins.n_prompts} prompts x {ins.max_new_tokens} new tokens, batch {ROLLOUT_BATCH}, "
                               f"~{PROMPT_TOKENS}-token prompts assumed"))
        for hook in cfg.hooks:
            passes = 2 + 2 * 2
            tokens = ins.n_prompts * seq
            steps.append(Step("segments", f"chat {hook}", tokens, passes * tokens, 10_000,
                              chat.n_params * model_b + min(tokens, ev.batch_tokens) * chat.vocab * 4 * 3, 0,
                              passes * _forward_flops(chat, tokens), note=f"{passes} passes over the rollouts"))
    base = shapes["base"]
    steps.append(Step("weight-diff", "base vs chat", 0, 0, 10_000, 0, 2 * 8 * base.n_params // max(base.n_layers, 1),
                      3.0 * base.n_params, note="reads both checkpoints tensor by tensor"))
    if cfg.diffing.enabled:
        dcfg = cfg.diffing
        if dcfg.corpus or live:  # live training: diffing caches its own (smaller) share of the study corpus
            caches(dcfg.corpus or cfg.corpus.source, dcfg.tokens, " (diffing corpus)")
        rows = min(dcfg.stats_tokens, dcfg.tokens if dcfg.corpus or live else cfg.corpus.train_tokens)
        for hook in cfg.hooks:
            d = base.d_model
            F = sae.expansion * d
            steps.append(Step("diff-saes", hook, 2 * rows, 0, 4 * n_saes * F * 8, n_saes * 4 * sae_weights(d, F)
                              + 3 * sae.batch_size * F * 4, rows * d * 4 * 2, 2.0 * 2 * rows * n_saes * 2 * d * F,
                              kind="sae", note=f"{rows} rows per model, {n_saes} SAEs, stats/matching/examples"))
            if dcfg.crosscoder:
                L = dcfg.crosscoder_expansion * d
                w = 2 * (2 * d * L) + L + 2 * d  # encoder and decoder over both models' d_model
                device = 16 * w + 3 * sae.batch_size * L * 4 + 4 * sae.batch_size * 2 * d * 4
                disk = 4 * w + KEEP_CHECKPOINTS * 3 * 4 * w
                steps.append(Step("train-crosscoder", hook, dcfg.crosscoder_tokens, 0, disk, device,
                                  2 * SHUFFLE_BUFFER_TOKENS * d * 4, 6.0 * dcfg.crosscoder_tokens * w, kind="sae",
                                  note=f"{L} latents, k {dcfg.crosscoder_k}"))
                steps.append(Step("diff-crosscoder", hook, rows, 0, 4 * L * 8, 4 * w, rows * 2 * d * 4,
                                  2.0 * rows * w, kind="sae"))
            if dcfg.causal and cfg.instructions.enabled:
                tokens = cfg.instructions.n_prompts * (PROMPT_TOKENS + cfg.instructions.max_new_tokens)
                passes = 1 + dcfg.top_latents
                steps.append(Step("causal-check", hook, tokens, passes * tokens, 10_000,
                                  chat.n_params * model_b + min(tokens, ev.batch_tokens) * chat.vocab * 4 * 3, 0,
                                  passes * _forward_flops(chat, tokens), note=f"{passes} passes: clean + one per ablated latent"))
    if live:
        steps = _live_streams(cfg, shapes, steps)
    return steps


def _live_streams(cfg: StudyConfig, shapes: dict[str, ModelShape], steps: list[Step]) -> list[Step]:
    """Live training: each model trains all its SAEs (every hook, every variant) from one stream,
    the fine-tunes from one stream of the chat model. The stream's forward passes (up to the
    deepest hook, for the largest token budget) and its token file (int32, on the local disk) are
    charged to the group's first step; the others read the same stream."""
    groups: dict[str, list[int]] = {}
    for i, st in enumerate(steps):
        if st.step in ("train-sae", "finetune-sae"):
            groups.setdefault("finetune" if st.step == "finetune-sae" else st.target.split()[0], []).append(i)
    for group, members in groups.items():
        shape = shapes["chat" if group in ("chat", "finetune") else "base"]
        deepest = max(cfg.hooks, key=lambda h: hook_blocks(h, shape.n_layers))
        tokens = max(steps[i].tokens for i in members)
        first = steps[members[0]]
        steps[members[0]] = dataclasses.replace(
            first, model_tokens=tokens, flops=first.flops + _forward_flops(shape, tokens, deepest),
            disk_bytes=first.disk_bytes + 4 * tokens,
            note=f"{first.note}; live: one stream (forward to {deepest}) for {len(members)} SAE(s)")
        for i in members[1:]:
            steps[i] = dataclasses.replace(steps[i], note=f"{steps[i].note}; live: the same stream")
    return steps


def estimate_seconds(step: Step, gpu: GPU | None, rate: float | None = None) -> float:
    """Seconds of `step` on `gpu` (published rates x UTILISATION) or at a measured `rate` (FLOP/s,
    already an achieved figure: used as is for SAE steps, halved for model passes)."""
    if gpu is not None:
        compute = step.flops / ((gpu.tf32_flops if step.kind == "sae" else gpu.bf16_flops) * UTILISATION)
        memory = step.decode_bytes / (gpu.bandwidth * BANDWIDTH_UTILISATION)
        return max(compute, memory)
    assert rate is not None
    return step.flops / (rate if step.kind == "sae" else rate * 0.5)


def plan_study(cfg: StudyConfig, *, gpu: str | None = None, shapes: Mapping | None = None, device: str | None = None,
               rate: float | None = None, config_name: str = "") -> Plan:
    """The plan of `cfg`: every step with its cost, time on the detected device (a matmul timed
    once unless `rate` is given) and, with `gpu` (h100, a100, h200), on that GPU."""
    if gpu is not None and gpu.lower() not in GPUS:
        raise UserError(f"--gpu {gpu!r}: pick one of {', '.join(GPUS)}")
    model_shapes = study_shapes(cfg, shapes)
    steps = plan_steps(cfg, model_shapes)
    name, local_gpu = detect_device(device or cfg.device)
    if local_gpu is None and rate is None:
        rate = measured_rate(device or cfg.device or "cpu")
    named = GPUS[gpu.lower()] if gpu else None
    steps = [replace(s, seconds=estimate_seconds(s, local_gpu, rate),
                     gpu_seconds=estimate_seconds(s, named) if named else None) for s in steps]
    assumptions = {
        "utilisation": UTILISATION, "decode_bandwidth_utilisation": BANDWIDTH_UTILISATION,
        "device_rate": f"{local_gpu.name} published" if local_gpu else f"measured fp32 matmul {rate / 1e9:.1f} GFLOP/s",
        "gpu_rates": {k: asdict(v) for k, v in GPUS.items()},
        "forward_flops": "2 x params x tokens (blocks up to the hook for cache and norm passes)",
        "sae_step_flops": "6 x tokens x SAE weights = 12 x tokens x d_model x d_sae",
        "cached": "checked for activation caches only (complete dataset folder of the same model, hook, budget, dtypes)",
    }
    return Plan(config_name or cfg.name, model_shapes, steps, name, gpu.lower() if gpu else None, assumptions)


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def human_seconds(s: float | None) -> str:
    if s is None:
        return ""
    if s < 0.01:
        return "<0.01 s"
    for unit, size in (("y", 365.25 * 86400), ("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.2g} s"


def human_count(n: float) -> str:
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def free_bytes(folder: str | Path) -> int:
    """Free bytes of the file system that holds `folder` (or would: its nearest existing parent);
    for an object-store folder, of this host's mirror of it, where its data is staged."""
    place = location(folder)
    path = (mirror_dir(place) if isinstance(place, RemotePath) else place).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require_free_space(needed: int, folder: str | Path, what: str, fix: str) -> None:
    """UserError, one line, when `needed` bytes would not fit the free space of `folder`."""
    free = free_bytes(folder)
    if needed > free:
        raise UserError(f"{what} needs {human_bytes(needed)} ({needed} B) but {folder} has {human_bytes(free)} "
                        f"({free} B) free: {fix}")
