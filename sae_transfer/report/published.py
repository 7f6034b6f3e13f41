"""The study's published numbers, for the pairs it used, shown beside ours in the report.

`sae_transfer/configs/published.json` holds them (copied from the result files released with
the study's scripts; its `source` field cites the post and the files). A pair is matched by the
last path component of its base and chat model ids, as the catalog labels models, so a local
copy of `mistralai/Mistral-7B-v0.1` named `Mistral-7B-v0.1` matches too.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pandas as pd

PUBLISHED_JSON = Path(__file__).resolve().parent.parent / "configs" / "published.json"
COLUMNS = ["data", "outliers", "metric", "sae -> model", "published", "source"]


@cache
def published() -> dict:
    """The whole published.json: `source`, `definitions` and one entry per study pair."""
    return json.loads(PUBLISHED_JSON.read_text(encoding="utf-8"))


def _name(model_id: str) -> str:
    return str(model_id).rstrip("/").rsplit("/", 1)[-1].lower()


def published_pair(base: str, chat: str) -> dict | None:
    """The study's entry for (base, chat) (hook, d_sae, outlier_threshold, eval_tokens,
    results), or None when the study did not use this pair."""
    for pair in published()["pairs"]:
        if (_name(pair["base"]), _name(pair["chat"])) == (_name(base), _name(chat)):
            return pair
    return None


def published_rows(base: str, chat: str) -> pd.DataFrame:
    """One row per (data, outliers, metric, SAE -> model) the study published for this pair, with
    the value and the file it comes from; empty (with the columns) for a pair it did not use."""
    pair = published_pair(base, chat)
    rows = [] if pair is None else [
        {"data": r["data"], "outliers": r["outliers"], "metric": metric, "sae -> model": f"{r['sae']} -> {r['model']}",
         "published": value, "source": r["file"]}
        for r in pair["results"] for metric, value in r["metrics"].items()]
    return pd.DataFrame(rows, columns=COLUMNS)


def published_note(base: str, chat: str) -> str | None:
    """One sentence naming the study's setting for this pair and citing it; None if not a study pair."""
    pair = published_pair(base, chat)
    if pair is None:
        return None
    return (f"The study's published values for this pair, at {pair['hook']} with {pair['d_sae']} latents, outlier "
            f"threshold {pair['outlier_threshold']}, {pair['eval_tokens']} eval tokens on the Pile. "
            f"Definitions: {published()['definitions']}. Source: {published()['source']}.")


def beside_ours(rows: pd.DataFrame, transfer: pd.DataFrame, hook: str) -> pd.DataFrame:
    """`rows` (published_rows) with an `ours` column: the same metric of our transfer table
    (`transfer_table` query) at `hook` for the same outlier policy and SAE -> model, on the Pile
    rows (empty where we have no such row yet, and on the Alpaca rows)."""
    ours = []
    for r in rows.itertuples(index=False):
        sae, model = r[3].split(" -> ")
        skip = transfer.empty or r.data != "pile" or r.metric not in transfer.columns
        match = None if skip else transfer[(transfer["hook"] == hook) & (transfer["outlier_policy"] == r.outliers)
                                          & (transfer["sae"] == sae) & (transfer["model"] == model)]
        ours.append(None if match is None or match.empty else match[r.metric].iloc[0])
    out = rows.copy()
    out.insert(out.columns.get_loc("published") + 1, "ours", ours)
    return out
