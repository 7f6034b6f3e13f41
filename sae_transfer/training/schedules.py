"""Learning-rate and sparsity-coefficient schedules: pure functions of the step number."""

from __future__ import annotations


def lr_multiplier(step: int, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """LR / base LR at `step` (0-based): linear warm-up (from 1/warmup_steps up to 1) over the
    first warmup_frac of steps, constant, then linear decay reaching 0 at the last step + 1."""
    warmup = int(round(warmup_frac * total_steps))
    decay = int(round(decay_frac * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay and step >= total_steps - decay:
        return max(0.0, (total_steps - step) / decay)
    return 1.0


def rewarmup_multiplier(step: int, resample_steps: list[int], drop: float, rewarmup_steps: int) -> float:
    """Extra LR factor after resampling (Conmy's 1L-SAE tricks): `drop` right after each
    resample at step r, rising linearly back to 1 at r + rewarmup_steps."""
    factor = 1.0
    for r in resample_steps:
        if rewarmup_steps and r <= step < r + rewarmup_steps:
            factor = min(factor, drop + (1.0 - drop) * (step - r) / rewarmup_steps)
    return factor


def sparsity_multiplier(step: int, total_steps: int, warmup_frac: float) -> float:
    """Sparsity coefficient / its final value: linear ramp from 0 over the first warmup_frac."""
    warmup = int(round(warmup_frac * total_steps))
    return min(1.0, (step + 1) / warmup) if warmup else 1.0
