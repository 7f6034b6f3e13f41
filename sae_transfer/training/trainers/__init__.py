"""Per-architecture trainers behind one interface (`Trainer`), sharing one training loop."""

from sae_transfer.sae import SAE
from sae_transfer.training.config import TrainConfig
from sae_transfer.training.trainers.base import StepLoss, Trainer
from sae_transfer.training.trainers.batchtopk import BatchTopKTrainer
from sae_transfer.training.trainers.jumprelu import JumpReluTrainer
from sae_transfer.training.trainers.relu import ReluTrainer
from sae_transfer.training.trainers.topk import TopKTrainer

TRAINERS: dict[str, type[Trainer]] = {
    "relu": ReluTrainer,
    "topk": TopKTrainer,
    "batchtopk": BatchTopKTrainer,
    "jumprelu": JumpReluTrainer,
}


def make_trainer(sae: SAE, cfg: TrainConfig, sparse_kernels: str | None = None) -> Trainer:
    """The trainer for cfg.arch, wrapping `sae` (sparse_kernels: "csr" or "dense"; None:
    cfg.sparse_kernels, "auto" resolved for the SAE's device)."""
    return TRAINERS[cfg.arch](sae, cfg, sparse_kernels)


__all__ = ["Trainer", "StepLoss", "TRAINERS", "make_trainer"]
