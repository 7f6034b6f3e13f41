"""sae-transfer: do sparse autoencoders transfer between base and chat models?

The science lives here in plain torch (no Prefect, no DuckDB); `storage/` owns the
disk, `tasks/` wraps steps as Prefect tasks and `flows/` composes them.

Tensor-name shape legend used throughout:
    B  batch of tokens          S  sequence position      N  number of sequences
    D  d_model (SAE d_in)       F  SAE features (d_sae)   K  top-k active features
    V  vocabulary
e.g. `acts_BD`, `W_dec_FD`, `feats_BF`, `tokens_NS`.
"""

__version__ = "0.1.0"
