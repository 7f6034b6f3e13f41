"""Schemas of the tables the DAG itself writes (runs, watched checkpoints), and where the
catalog finds tables written elsewhere (training logs inside SAE run folders)."""

from __future__ import annotations

import pyarrow as pa

from sae_transfer.storage.layout import RunLayout, StudyLayout
from sae_transfer.storage.result_keys import LOG, ResultKey, row

_STR, _F64, _I64, _TS = pa.string(), pa.float64(), pa.int64(), pa.timestamp("us", tz="UTC")

RUNS = pa.schema(
    [
        ("run_id", _STR),  # Prefect flow run id (or "local")
        ("flow", _STR),  # transfer_study, evaluate_checkpoint, ...
        ("study", _STR),  # study name
        ("config_hash", _STR),  # StudyConfig.fingerprint()
        ("config_json", _STR),  # the whole config, canonical JSON
        ("code_version", _STR),  # sae-transfer version + git commit when known
        ("step", _STR),  # DAG step name, or "total"
        ("seconds", _F64),  # wall time of the step
        ("cached", pa.bool_()),  # True when the step's output already existed
        ("created_at", _TS),
    ]
)

CHECKPOINTS = pa.schema(
    [
        ("checkpoint_id", _STR),  # content fingerprint of the checkpoint folder (or Hub commit sha)
        ("path", _STR),  # local folder or hub://repo@revision
        ("step", _I64),  # fine-tuning step parsed from the name, -1 if unknown
        ("status", _STR),  # "seen" when the watcher started its evaluation, "evaluated" when it finished
        ("flow_run_id", _STR),
        ("created_at", _TS),
    ]
)

# Columns the report reads from SAE training logs (the trainer writes more); used only to
# give the view its columns before any SAE has been trained.
TRAINING_LOG_STUB = pa.schema(
    [("sae_id", _STR), ("step", _I64), ("tokens", _I64), ("lr", _F64), ("loss", _F64), ("mse", _F64),
     ("l0", _F64), ("explained_variance", _F64), ("dead_fraction", _F64)]
)

# View name -> (glob relative to the results root, schema for an empty view).
# (runs and checkpoints are plain tables in sae_transfer.storage.tables.SCHEMAS.)
SOURCES: dict[str, tuple[str, pa.Schema | None]] = {
    "training_log": (StudyLayout.in_every_run(RunLayout.TRAINING_LOG_DIR, "part-*.parquet"), TRAINING_LOG_STUB),
}

# Result key of each table (see sae_transfer.storage.result_keys): what its catalog view keeps
# one of; `<name>_history` keeps every row.
KEYS: dict[str, ResultKey] = {
    "runs": LOG,  # provenance log: one row per DAG step of every pipeline run, all kept
    "checkpoints": row("checkpoint_id"),  # each checkpoint's latest status; the history has every seen / evaluated
    "training_log": LOG,  # every logged step of every SAE run (a run's folder holds one run)
}

# Views whose rows get the SAE run folder name (saes/<name>/...) as column `sae_id`.
RUN_FOLDER_COLUMN = {"training_log": "sae_id"}
