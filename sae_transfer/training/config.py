"""One frozen config for SAE training and fine-tuning (it is also what run.json records)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sae_transfer.study import SAESection

_SAE = SAESection()  # the study config's SAE defaults are the trainer's

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
DTYPES = ("float32", "bfloat16")
SPARSE_KERNELS = ("auto", "csr", "dense")
INIT_B_DEC = ("auto", "geometric_median", "mean", "zeros")
# Fields that say where and how fast a run computes, not what it learns: a checkpoint or a
# finished run matches a config that differs only in these (a GPU run resumes on a CPU).
RUNTIME_FIELDS = ("device", "dtype", "tf32", "sparse_kernels", "num_threads")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (together with the activation data)."""

    arch: str = "relu"  # relu | topk | batchtopk | jumprelu
    d_sae: int = 2048  # number of features (16× d_model is the study's expansion)
    total_tokens: int = 1_000_000  # token budget; steps = total_tokens // batch_size
    batch_size: int = _SAE.batch_size  # tokens per step (the study: 4096 pre-training, 256 fine-tuning)
    lr: float = _SAE.lr  # Adam LR (Conerly et al. April 2024 update uses ~5e-5 at scale; small SAEs like more)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    lr_warmup_frac: float = 0.0  # linear warm-up from 0 over this fraction of steps
    lr_decay_frac: float = 0.2  # linear decay to 0 over the last fraction of steps (April update: 20%)
    l1_coefficient: float = _SAE.l1_coefficient  # relu: weight of Σ_f f·‖W_dec_f‖ (scaled units, mean over tokens)
    l1_warmup_frac: float = 0.05  # relu/jumprelu: sparsity coefficient ramps 0 -> full over this fraction
    k: int = _SAE.k  # topk: active features per token; batchtopk: mean active per token
    aux_k: int | None = None  # topk/batchtopk AuxK: dead latents used to model the residual (None: d_in // 2)
    aux_coefficient: float = 1 / 32  # AuxK loss weight (Gao et al.)
    jumprelu_init_threshold: float = 0.001  # initial threshold of every feature (scaled units)
    jumprelu_bandwidth: float = 0.001  # STE rectangle-kernel width ε
    jumprelu_l0_mode: str = "step"  # "step": Σ H(pre-θ) with STE; "tanh": Σ tanh(c·f·‖W_dec‖)
    jumprelu_tanh_scale: float = 4.0  # c in the tanh penalty
    normalize_activations: bool = True  # scale acts to mean norm √d_in (folded into saved weights)
    scale_estimate_tokens: int = 65_536  # tokens read to estimate the scale factor and b_dec init
    init_b_dec: str = "auto"  # auto (relu: zeros; others: geometric_median) | geometric_median | mean | zeros
    init_decoder_norm: float = 0.1  # decoder rows start with this norm, W_enc = W_decᵀ (April update; every arch)
    grad_clip: float = 1.0  # max global grad norm (0: off)
    dead_window_tokens: int = 1_000_000  # a latent is dead if it has not fired for this many tokens
    ghost_grads: bool = False  # relu: add the ghost-grad loss for dead latents (exp of pre-activation)
    resample_every_steps: int = 0  # relu: Anthropic resampling of dead latents every N steps (0: off)
    resample_until_frac: float = 0.6  # no resampling after this fraction of training
    resample_lr_drop: float = 0.1  # after a resample, LR × this, then linear re-warm-up
    resample_rewarmup_steps: int = 100  # steps of the re-warm-up after each resample
    log_every_steps: int = 50  # training-log row every N steps
    checkpoint_every_tokens: int = 10_000_000  # checkpoint every N tokens (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # weight init, data order, resampling
    num_threads: int = 0  # torch threads (0: leave torch's default)
    device: str | None = None  # "cpu", "cuda", "cuda:1", ...; None: CUDA when available, else CPU
    dtype: str = "float32"  # matmul precision: float32, or bfloat16 (autocast: weights and Adam state stay fp32)
    tf32: bool = True  # CUDA only: fp32 matmuls may use TF32 tensor cores (recorded in run.json)
    # topk/batchtopk/jumprelu: csr (torch.sparse), dense ([B,F] matmuls); auto: csr on CPU, dense on CUDA
    sparse_kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}: use one of {ARCHS}")
        if self.batch_size < 1 or self.total_tokens < self.batch_size:
            raise ValueError(f"total_tokens={self.total_tokens}, batch_size={self.batch_size}: "
                             "need total_tokens >= batch_size >= 1")
        if not 0 <= self.lr_warmup_frac + self.lr_decay_frac <= 1:
            raise ValueError(f"lr_warmup_frac + lr_decay_frac = {self.lr_warmup_frac + self.lr_decay_frac}: must lie in [0, 1]")
        if self.init_b_dec not in INIT_B_DEC:
            raise ValueError(f"init_b_dec={self.init_b_dec!r}: use one of {INIT_B_DEC}")
        if self.jumprelu_l0_mode not in ("step", "tanh"):
            raise ValueError(f"jumprelu_l0_mode={self.jumprelu_l0_mode!r}: use step or tanh")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: use one of {DTYPES} (bfloat16 runs the matmuls in bf16, weights stay fp32)")
        if self.sparse_kernels not in SPARSE_KERNELS:
            raise ValueError(f"sparse_kernels={self.sparse_kernels!r}: use one of {SPARSE_KERNELS}")
        if (self.ghost_grads or self.resample_every_steps) and self.arch != "relu":
            raise ValueError(f"ghost_grads/resampling apply to arch=relu, not {self.arch!r}; TopK uses AuxK")

    @property
    def b_dec_init(self) -> str:
        """init_b_dec with "auto" resolved: zeros for relu, the geometric median otherwise. On
        the demo's activations (bench_frontier.py, 1.2M tokens) relu from the median sat below
        SAELens's frontier (L0 58, EV 0.47 at L1 12 where that frontier gives 0.60) and from
        zeros on it; TopK reconstructs better from the median. Data far from the origin compared
        with its spread learns its offset slowly from zeros: set the median there."""
        if self.init_b_dec != "auto":
            return self.init_b_dec
        return "zeros" if self.arch == "relu" else "geometric_median"

    @property
    def total_steps(self) -> int:
        """Optimiser steps in the run."""
        return self.total_tokens // self.batch_size

    def to_dict(self) -> dict:
        """JSON-ready dict (run.json, checkpoint state)."""
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    def learning_dict(self) -> dict:
        """to_dict without RUNTIME_FIELDS: what a resumed or re-run run must match."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of to_dict; unknown keys are an error."""
        d = dict(d)
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)


def finetune_defaults(base: TrainConfig | None = None, **overrides) -> TrainConfig:
    """The seed study's fine-tuning recipe: same LR and sparsity coefficient as pre-training,
    linear warm-up over the first 5%, decay to zero over the last 20%, batch 256, no
    L1 warm-up, 5M tokens, no resampling."""
    base = base or TrainConfig()
    recipe = dict(
        lr_warmup_frac=0.05, lr_decay_frac=0.2, batch_size=256, l1_warmup_frac=0.0, total_tokens=5_000_000,
        resample_every_steps=0, ghost_grads=False, init_b_dec="zeros",
    )
    return dataclasses.replace(base, **{**recipe, **overrides})
