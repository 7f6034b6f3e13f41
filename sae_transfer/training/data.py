"""Open training data: a Parquet activation dataset folder (streamed through the shuffle
buffer) or a .safetensors file holding one [N, D] tensor `acts` (in memory; tests, benches)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from sae_transfer.errors import UserError
from sae_transfer.storage.activations import ActivationDataset
from sae_transfer.storage.activations_read import ActivationReader
from sae_transfer.study import SAESection
from sae_transfer.training.sources import SourceFactory, in_memory_factory

BUFFER_TOKENS = SAESection().buffer_tokens  # shuffle buffer of the cached and the live reader alike


@dataclass(frozen=True)
class TrainingData:
    """A way to stream batches, plus what cfg.json's metadata should say about it."""

    make_source: SourceFactory  # start_batch -> iterable of raw acts_BD
    d_in: int  # activation width
    metadata: dict  # model_name, hook_name, context_size, prepend_bos, dataset_path
    n_tokens: int  # tokens available per epoch
    live: object = None  # the LiveActivations behind a live source (its counters), else None


def open_training_data(path: str | Path, batch_size: int, seed: int = 0, buffer_tokens: int = BUFFER_TOKENS) -> TrainingData:
    """TrainingData for a dataset folder written by `sae-transfer cache`, or a .safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass an activation dataset folder or a .safetensors file")
        tensors = load_file(str(path))
        if "acts" not in tensors or tensors["acts"].ndim != 2:
            raise UserError(f"{path} needs one 2-D tensor named 'acts' [tokens, d_model]")
        acts_ND = tensors["acts"]
        meta = {"dataset_path": str(path), "model_name": None, "hook_name": None}
        return TrainingData(in_memory_factory(acts_ND, batch_size, seed=seed, name=str(path)), acts_ND.shape[1], meta,
                            acts_ND.shape[0])
    ds = ActivationDataset(path)
    buffer_tokens = max(buffer_tokens, 2 * batch_size)
    meta = {
        "model_name": ds.meta.get("model_id"),
        "model_revision": ds.meta.get("model_revision"),
        "hook_name": ds.hook,
        "context_size": ds.meta.get("context_size"),
        "prepend_bos": ds.meta.get("prepend_bos", True),
        "dataset_path": str(path),
        "corpus_fingerprint": ds.meta.get("corpus_fingerprint"),
    }

    def make_source(start_batch: int):
        return ActivationReader(path, batch_size=batch_size, buffer_tokens=buffer_tokens, seed=seed, start_batch=start_batch)

    return TrainingData(make_source, ds.d_model, meta, ds.n_tokens)
