"""SAE training: one shared loop (`loop`), per-architecture trainers (`trainers/`), schedules,
tricks (geometric median, dead tracking, ghost grads, resampling) and run folders (`run`).

Plain torch: imports neither prefect nor duckdb."""

from sae_transfer.training.config import TrainConfig, finetune_defaults

__all__ = ["TrainConfig", "finetune_defaults"]
