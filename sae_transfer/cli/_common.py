"""What every command shares: the one parser of sizes and token counts, the one table printer,
and checks that refuse a bad option value before any model or SAE is loaded."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from sae_transfer.errors import UserError

# Decimal suffixes count tokens or bytes (k = 1000); binary ones (KiB = 1024) are for bytes.
_UNITS = {"k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "b": 10**9}


def parse_count(text: str, option: str, minimum: int = 1) -> int:
    """'5M', '800k', '1e6', '4096', '128MiB' -> an int >= `minimum` (tokens, rows or bytes).

    `option` names the flag in the error (e.g. "--tokens"); values below `minimum`, non-finite
    or unreadable ones raise UserError saying what to write instead."""
    low = str(text).strip().lower().replace("_", "")
    number, scale = low, 1
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if low.endswith(suffix) and low[: -len(suffix)]:
            number, scale = low[: -len(suffix)], _UNITS[suffix]
            break
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{option} {text!r}: not a count; write e.g. 4096, 1e6, 5M or 128MiB")
    if value < minimum:
        raise UserError(f"{option} {text!r}: must be at least {minimum}; write e.g. 4096, 1e6, 5M or 128MiB")
    return int(value)


def parse_int_list(text: str, option: str, minimum: int = 1) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); UserError naming `option` unless every item is an int >= `minimum`."""
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < minimum:
        raise UserError(f"{option} {text!r}: write comma-separated whole numbers >= {minimum}, e.g. 1,2,4")
    return values


def require(ok: bool, option: str, value, fix: str) -> None:
    """UserError `<option> <value>: <fix>` unless `ok` (for ranges typer cannot state, e.g. > 0)."""
    if not ok:
        raise UserError(f"{option} {value!r}: {fix}")


def print_table(columns: Sequence[str], rows: Iterable[Sequence | Mapping], *, total: int | None = None,
                digits: int = 4) -> None:
    """Print rows (dicts keyed by column, or sequences in `columns` order) as a rich table;
    floats to `digits` significant digits, None as blank. `total`: how many rows exist in all
    (a note says how many were left out)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*[str(c) for c in columns])
    shown = 0
    for row in rows:
        row = [row.get(c) for c in columns] if isinstance(row, Mapping) else row
        table.add_row(*("" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in row))
        shown += 1
    console = Console(width=max(120, 15 * len(columns)))
    console.print(table)
    if total is not None and total > shown:
        console.print(f"... {total - shown} more rows (use --format csv for all)")
