"""The study config: one validated object that names the model pair, hooks, corpora, token
budgets, SAE settings and outlier rules. It is the `transfer_study` flow's parameter."""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sae_transfer.errors import UserError
from sae_transfer.storage.store import RemotePath, location


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PairConfig(_Section):
    """The base model and its chat fine-tune (Hub ids, local checkpoint folders, or s3:// prefixes of one)."""

    base: str = Field("artifacts/demo-models/base", description="base model: Hub id, local HF folder or s3:// prefix")
    chat: str = Field("artifacts/demo-models/chat", description="chat fine-tune of `base`")
    base_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of base")
    chat_revision: str | None = Field(None, description="Hub revision of chat")
    checkpoints: str | None = Field(
        "artifacts/demo-models/chat-checkpoints", description="folder (or s3:// prefix) of fine-tuning checkpoints to watch")
    checkpoints_repo: str | None = Field(None, description="Hub repo whose revisions are checkpoints (online only)")
    build_demo: bool = Field(True, description="build the offline demo pair first if base/chat are the demo folders")
    demo_preset: Literal["default", "tiny"] = Field(
        "default", description="demo pair size; 'tiny' is a seconds-sized pair for smoke tests")
    trust_remote_code: bool = Field(
        False, description="let a Hub model's own modelling code run; only for models whose code you have read")


class CorpusSection(_Section):
    """Text the SAEs are trained and evaluated on (the study used the Pile)."""

    source: str = Field(
        "stdlib", description="'stdlib', a local .txt/.jsonl/.parquet file or folder, or a Hub dataset id")
    text_column: str = Field("text", description="text column of .jsonl/.parquet/Hub sources")
    context_size: int = Field(128, ge=2, description="tokens per sequence, BOS included")
    prepend_bos: bool = Field(True, description="prepend BOS to every sequence (the study did)")
    train_tokens: int = Field(600_000, gt=0, description="activations cached per model for SAE training")
    seed: int = Field(0, description="seed of the document train/eval split")


class SAESection(_Section):
    """SAE architecture and training budget (defaults follow the study's Conerly et al. setup)."""

    arch: Literal["relu", "topk", "batchtopk", "jumprelu"] = Field(
        "relu", description="SAE architecture (the study trained ReLU SAEs)")
    expansion: int = Field(16, ge=1, description="d_sae = expansion x d_model")
    l1_coefficient: float = Field(5.0, ge=0, description="sparsity penalty (relu)")
    k: int = Field(32, ge=1, description="active features (topk/batchtopk)")
    lr: float = Field(4e-4, gt=0, description="Adam learning rate, also used for fine-tuning (the study's recipe)")
    batch_size: int = Field(4096, ge=1, description="tokens per step in pre-training")
    train_tokens: int = Field(
        1_200_000, gt=0, description="pre-training token budget per SAE (epochs over the cache if larger)")
    source: Literal["auto", "cache", "live"] = Field(
        "auto", description="training activations (and fine-tuning's): 'cache' writes corpus.train_tokens per model "
        "to disk first; 'live' runs the model through a shuffle buffer, nothing on disk; 'auto': the cache when both "
        "models' caches fit the results folder's free disk, else live")
    buffer_tokens: int = Field(
        262_144, ge=1, description="shuffle buffer of live training, in tokens (the cache reader's, so both mix alike)")
    sweep: dict[str, list] = Field(
        {}, description="settings to sweep, e.g. {l1_coefficient: [2, 5, 12]}: one SAE per combination, per model and "
        "hook, every one in the transfer matrix; trained live, all from one forward pass per model")

    @model_validator(mode="after")
    def _check_sweep(self) -> SAESection:
        for key, values in self.sweep.items():
            if key not in SWEEPABLE:
                why = ("the SAEs of a sweep share one stream, batched once" if key in ("batch_size", "buffer_tokens")
                       else "it is not a setting of one SAE")
                raise ValueError(f"sae.sweep cannot vary {key!r} ({why}); sweep any of {', '.join(SWEEPABLE)}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"sae.sweep.{key} must be a non-empty list of values, e.g. [2, 5, 12]")
            for v in values:
                SAESection(**{key: v})  # each value valid on its own (range, architecture name)
        return self

    def variants(self) -> list[tuple[str | None, SAESection]]:
        """(label, settings) of every SAE the section asks for: itself (label None) without a sweep,
        else one per combination of the swept values, labelled `key=value,...` (the settings keep no
        sweep, so adding a value to a sweep never re-trains the SAEs already trained)."""
        if not self.sweep:
            return [(None, self)]
        keys = list(self.sweep)
        out = []
        for combo in itertools.product(*(self.sweep[k] for k in keys)):
            out.append((variant_label(zip(keys, combo)), self.model_copy(update={"sweep": {}, **dict(zip(keys, combo))})))
        return out


def variant_label(settings) -> str:
    """`key=value,...` for one combination of swept (key, value) settings: what a sweep's SAE is
    called in cfg.json, the tables and the report."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings)


# What `sae.sweep` may vary: the settings of one SAE (not of the stream they share).
SWEEPABLE = ("arch", "expansion", "l1_coefficient", "k", "lr", "train_tokens")


class FinetuneSection(_Section):
    """Fine-tuning the base SAE on chat activations (the study: 5M tokens, batch 256)."""

    enabled: bool = Field(True, description="train the fine-tuned base SAE")
    tokens: int = Field(
        100_000, gt=0, description="fine-tuning token budget (1/12 of pre-training; the study: 5M of 800M)")
    batch_size: int = Field(256, ge=1, description="tokens per fine-tuning step (the study: 256)")


class OutlierSection(_Section):
    """Outlier-norm rules on scaled norms (mean norm sqrt(d_model))."""

    rule: Literal["absolute", "k_median", "either"] = Field(
        "absolute", description="which tokens the 'excluded' metrics drop: the study's absolute threshold, k x median, or either")
    threshold: float | None = Field(
        None, ge=0, description="absolute scaled-norm threshold, one value for base and chat (the study: Qwen1.5 50, "
        "Gemma 300, Mistral 200); empty: median + mad_k MAD estimated on the base model, used for both")
    mad_k: float = Field(
        10.0, gt=0, description="robust estimate: median + mad_k * 1.4826 * MAD of the base model's scaled norms")
    k_median: float = Field(3.0, gt=1, description="k x median rule: scaled norm above k times the evaluated model's median")


class EvalSection(_Section):
    """Held-out evaluation budget."""

    tokens: int = Field(16_384, gt=0, description="eval tokens per (SAE, model) pair (the study used ~100k)")
    batch_tokens: int = Field(
        4096, ge=1, description="tokens per forward batch; logits of batch_tokens x vocabulary in the model dtype "
        "(CE/KL in 512-token chunks)")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the CE-loss-recovered interval")
    position_multiples: list[int] = Field(
        [1, 2, 4], description="context multiples for position curves (sizes the model cannot take are skipped)")


class InstructionSection(_Section):
    """Instruction-formatted data: prompts -> greedy chat rollouts -> segment metrics."""

    enabled: bool = Field(True, description="evaluate per segment (user prompt / rollout / template)")
    source: str = Field(
        "demo", description="'demo' (held-out docstrings), a local .jsonl of {'prompt': ...}, or a Hub id")
    n_prompts: int = Field(48, ge=1, description="instructions rolled out (the study used ~50 Alpaca instructions)")
    max_new_tokens: int = Field(96, ge=1, description="rollout length cap, in tokens")


class ModelLoading(_Section):
    """How every step loads a model of the pair: one object, so no step can drop a flag on the way."""

    device: str | None = Field(None, description="cuda, cuda:1, cpu ...; empty = CUDA when available, else CPU")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="model dtype")
    trust_remote_code: bool = Field(False, description="let a Hub model's own modelling code run")


class TextSource(_Section):
    """Which documents text comes from and how they split into train and eval (not how much is read)."""

    source: str = Field("stdlib", description="'stdlib', a local file or folder, or a Hub dataset id")
    text_column: str = Field("text", description="text column of .jsonl/.parquet/Hub sources")
    seed: int = Field(0, description="seed of the document train/eval split")


class EvalSettings(_Section):
    """Everything an evaluation step reads (outliers, transfer, positions, segments): the held-out
    text, the budget, the outlier rule, how models load and the bootstrap seed. Evaluation tasks
    take this object and nothing else of the study, so their cache keys change only with it."""

    text: TextSource = Field(TextSource(), description="held-out documents (the eval split of the study corpus)")
    context_size: int = Field(128, ge=2, description="tokens per sequence where no SAE fixes it (outlier tagging)")
    eval: EvalSection = Field(EvalSection(), description="budget and batch size")
    outliers: OutlierSection = Field(OutlierSection(), description="outlier rules")
    loading: ModelLoading = Field(ModelLoading(), description="how models load")
    seed: int = Field(0, description="bootstrap seed")


class CrosscoderPlan(_Section):
    """What the crosscoder's training reads (and nothing the analyses after it read)."""

    expansion: int = Field(ge=1, description="latents = expansion x d_model (diffing.crosscoder_expansion)")
    k: int = Field(ge=1, description="mean active latents per token, BatchTopK (diffing.crosscoder_k)")
    tokens: int = Field(gt=0, description="training tokens, epochs over the caches if larger (diffing.crosscoder_tokens)")
    lr: float = Field(gt=0, description="Adam learning rate (diffing.crosscoder_lr)")
    batch_size: int = Field(ge=1, description="tokens per step (sae.batch_size)")
    seed: int = Field(description="seed of initialisation and shuffling (the study's seed)")


class RunnerSection(_Section):
    """Where the DAG's heavy steps run: worker processes of this machine (the default), or a Dask
    cluster through prefect-dask (a LocalCluster of `workers` processes on this host, or the
    scheduler at `address`), where each heavy step asks for one `gpu_resource` of a worker."""

    kind: Literal["processes", "dask"] = Field(
        "processes", description="'processes': worker processes of this machine; 'dask': a Dask cluster (prefect-dask)")
    workers: int | None = Field(
        None, ge=1, description="worker processes (or LocalCluster workers); empty: one per CUDA GPU, else 2 "
        "(each gets cores / workers threads)")
    address: str | None = Field(
        None, description="Dask scheduler to use, e.g. tcp://host:8786 (kind dask); empty: a LocalCluster on this host")
    gpu_resource: str | None = Field(
        "GPU", description="Dask worker resource each heavy step asks one of (start workers with --resources GPU=1, "
        "one per GPU); empty: any worker runs any step")
    result_storage: str | None = Field(
        None, description="URL of Prefect's task-result records, seen by every worker (e.g. s3://bucket/prefix); "
        "empty: <results_root>/.prefect-results when results_root is a URL, else Prefect's local storage")
    max_checkpoints: int = Field(
        2, ge=1, description="checkpoints the watcher evaluates at once (each evaluation fans out over hooks)")

    @model_validator(mode="after")
    def _check(self) -> RunnerSection:
        if self.address and self.kind != "dask":
            raise ValueError(f"address {self.address!r} is a Dask scheduler: set kind: dask, or drop address")
        return self


class DiffingSection(_Section):
    """Feature-level diffing: which latents changed between base and chat (issue "what changed inside")."""

    enabled: bool = Field(True, description="run the diffing stage (latent stats, matching, crosscoder, examples, causal check)")
    corpus: str | None = Field(
        None, description="text both models are cached on for diffing (chat-formatted data shows chat-only latents; "
        "'demo-mixed': stdlib files interleaved with demo chat transcripts); empty: the study corpus")
    tokens: int = Field(
        200_000, gt=0, description="tokens cached per model on the diffing corpus (when it is not the study corpus)")
    activation_diff: bool = Field(
        True, description="chat - base on the paired caches per token, role and position, with its principal directions")
    crosscoder: bool = Field(True, description="train a BatchTopK crosscoder on the paired base/chat caches (Minder et al. 2025)")
    crosscoder_expansion: int = Field(8, ge=1, description="crosscoder latents = expansion x d_model")
    crosscoder_k: int = Field(32, ge=1, description="mean active crosscoder latents per token (BatchTopK)")
    crosscoder_tokens: int = Field(300_000, gt=0, description="crosscoder training tokens (epochs over the caches if larger)")
    crosscoder_lr: float = Field(1e-3, gt=0, description="crosscoder Adam learning rate")
    stats_tokens: int = Field(
        131_072, gt=0, description="cache rows per model streamed for latent stats, matching, scaling and examples")
    examples_k: int = Field(8, ge=1, description="max-activating contexts kept per latent and model")
    top_latents: int = Field(6, ge=1, description="chat-only latents shown as cards (and ablated in the causal check)")
    causal: bool = Field(
        True, description="ablate the chat-only latents on chat transcripts and measure KL per segment (needs instructions)")
    checkpoint_finetune_tokens: int = Field(
        0, ge=0, description="per checkpoint: briefly fine-tune the base SAE on it and record latent drift (0: off)")


class StudyConfig(_Section):
    """One base-vs-chat transfer study."""

    name: str = Field("demo", description="results go to `<results_root>/<name>`")
    results_root: str = Field(
        "results", description="parent folder of every study's results, or an object-store prefix (s3://bucket/prefix)")
    pair: PairConfig = Field(PairConfig(), description="the base model, its chat fine-tune and their checkpoints")
    hooks: list[str] = Field(
        ["blocks.2.hook_resid_pre"], description="hook points studied (the study: middle-layer resid_pre)")
    corpus: CorpusSection = Field(CorpusSection(), description="text the SAEs are trained and evaluated on")
    sae: SAESection = Field(SAESection(), description="SAE architecture and training budget")
    finetune: FinetuneSection = Field(FinetuneSection(), description="fine-tuning the base SAE on chat activations")
    outliers: OutlierSection = Field(OutlierSection(), description="outlier-norm rules")
    eval: EvalSection = Field(EvalSection(), description="held-out evaluation budget")
    instructions: InstructionSection = Field(
        InstructionSection(), description="instruction-formatted data and segment metrics")
    diffing: DiffingSection = Field(DiffingSection(), description="feature-level diffing of base vs chat")
    device: str | None = Field(None, description="cuda, cuda:1, cpu ...; empty = CUDA when available, else CPU")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="model dtype (bf16 on GPUs for 7B models)")
    act_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="element dtype of cached activations")
    seed: int = Field(0, description="seed of SAE init, shuffling and bootstrap")
    runner: RunnerSection = Field(RunnerSection(), description="where the DAG's heavy steps run (processes or Dask)")

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if not self.hooks:
            raise ValueError("hooks: name at least one hook, e.g. blocks.6.hook_resid_pre")
        return self

    @property
    def results_dir(self) -> Path | RemotePath:
        """`<results_root>/<name>`: a Path, or a RemotePath when results_root is a URL (s3://...)."""
        return location(self.results_root) / self.name

    @property
    def loading(self) -> ModelLoading:
        """How every step loads the pair's models."""
        return ModelLoading(device=self.device, dtype=self.dtype, trust_remote_code=self.pair.trust_remote_code)

    @property
    def text(self) -> TextSource:
        """The study corpus's documents (what evaluation reads of `corpus`)."""
        c = self.corpus
        return TextSource(source=c.source, text_column=c.text_column, seed=c.seed)

    @property
    def eval_settings(self) -> EvalSettings:
        """What the evaluation steps read of this study."""
        return EvalSettings(text=self.text, context_size=self.corpus.context_size, eval=self.eval,
                            outliers=self.outliers, loading=self.loading, seed=self.seed)

    @property
    def crosscoder_plan(self) -> CrosscoderPlan:
        """What the crosscoder's training reads of this study."""
        d = self.diffing
        return CrosscoderPlan(expansion=d.crosscoder_expansion, k=d.crosscoder_k, tokens=d.crosscoder_tokens,
                              lr=d.crosscoder_lr, batch_size=self.sae.batch_size, seed=self.seed)

    def fingerprint(self) -> str:
        """Hash of the whole config (16 hex chars)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key {where!r}; remove it or fix its spelling (see sae_transfer/configs/demo.yaml)"
    return f"{source}: {where}: {err['msg']} (got {err.get('input')!r})"


def parse_study(data: dict, source: str = "config") -> StudyConfig:
    """Validate a dict as a StudyConfig; raise UserError with the first problem on one line."""
    try:
        return StudyConfig.model_validate(data or {})
    except ValidationError as exc:
        raise UserError(_format_error(exc, source)) from None


def load_study(path: str | Path) -> StudyConfig:
    """Read a YAML or TOML study config file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study config {str(path)!r} not found: pass a .yaml or .toml file (examples in sae_transfer/configs/)")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {str(exc).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys such as pair, hooks, corpus")
    return parse_study(data, str(path))


def example_config(name: str) -> Path:
    """Path of a shipped example config (demo, qwen1.5-0.5b, mistral-7b)."""
    path = Path(__file__).parent / "configs" / f"{name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise UserError(f"no example config {name!r}; shipped: {', '.join(shipped)}")
    return path


def config_json(cfg: StudyConfig) -> str:
    """Canonical JSON of a config (stored with every run for provenance)."""
    return json.dumps(cfg.model_dump(), sort_keys=True)
