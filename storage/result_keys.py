"""Result keys: what a re-run of a computation replaces, declared once per table beside its schema.

Re-runs append rows and the Parquet parts keep them all. Each table declares in a `KEYS` mapping
next to its `SCHEMAS` (`sae_transfer.storage.tables`, `.study_tables`, `.diffing_tables`) what
identifies one result, and the catalog (`sae_transfer.storage.catalog`) generates two views from it:

- `<table>_history`: every row ever appended;
- `<table>`: the current results only, by the key's kind:
  - `row(...)`: one row per key, the newest;
  - `computation(..., index=...)`: the key names one computation (an SAE on a model at a hook,
    one model's outlier tagging, ...) that writes many rows at once (per token, per latent,
    ...); the view keeps every row of that computation's newest write and none of an older
    one, so a re-run with fewer tokens or latents leaves no stale rows behind. `index` names
    what tells one computation's rows apart (documentation, checked by the tests);
  - `LOG`: every row (the view equals the history), for tables that are logs of events.

Newest means the latest `created_at`, ties broken by the part file name
(`part-<UTC write time>-<uuid>.parquet`, so later writes sort later), then by the row's
position in its part: deterministic for a given set of parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ResultKey:
    """How the catalog view of one table picks the current rows (see the module docstring)."""

    kind: Literal["row", "computation", "log"]
    columns: tuple[str, ...] = ()  # identify one result (row) or one computation
    index: tuple[str, ...] = ()  # computation only: identify one row within a computation


def row(*columns: str) -> ResultKey:
    """One current row per value of `columns` (the newest)."""
    return ResultKey("row", tuple(columns))


def computation(*columns: str, index: tuple[str, ...]) -> ResultKey:
    """Every row of the newest write of each computation named by `columns`."""
    return ResultKey("computation", tuple(columns), tuple(index))


LOG = ResultKey("log")
