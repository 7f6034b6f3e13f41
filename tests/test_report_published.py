"""The study's published numbers in the report, for the pairs the study used (and only those)."""

from __future__ import annotations

import pandas as pd

from sae_transfer.report.build import build_report
from sae_transfer.report.published import beside_ours, published, published_pair, published_rows
from tests import _synthetic_results as synth

MISTRAL = ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1")


def test_published_rows_for_a_study_pair_cite_their_file():
    rows = published_rows(*MISTRAL)
    assert "Kissane" in published()["source"] and "ckkissane/sae-transfer" in published()["source"]
    # the post's headline: the base SAE on the chat model recovers 98.86 % of CE loss (results file, ce_rec 0.98858)
    hit = rows[(rows["data"] == "pile") & (rows["outliers"] == "excluded") & (rows["metric"] == "ce_loss_rec_pct")
               & (rows["sae -> model"] == "base -> chat")]
    assert hit["published"].round(2).tolist() == [98.86] and hit["source"].tolist() == ["sae_transfer_results_post.json"]
    assert {"alpaca rollout", "alpaca user prompt"} <= set(rows["data"])
    assert "fine-tuned base -> chat" in set(rows["sae -> model"])
    assert published_pair("local/copies/Mistral-7B-v0.1/", "Mistral-7B-Instruct-v0.1")["hook"] == "blocks.16.hook_resid_pre"
    assert published_rows(synth.BASE, synth.CHAT).empty and published_pair(MISTRAL[1], MISTRAL[0]) is None


def test_ours_sit_beside_the_published_values():
    rows = published_rows(*MISTRAL)
    transfer = pd.DataFrame([{"hook": "blocks.16.hook_resid_pre", "outlier_policy": "excluded", "sae": "base", "model": "chat",
                              "l0": 120.0, "ce_loss_rec_pct": 98.5}])
    out = beside_ours(rows, transfer, "blocks.16.hook_resid_pre")
    assert list(out.columns) == ["data", "outliers", "metric", "sae -> model", "published", "ours", "source"]
    mine = out[(out["data"] == "pile") & (out["outliers"] == "excluded") & (out["sae -> model"] == "base -> chat")]
    assert mine.set_index("metric")["ours"][["l0", "ce_loss_rec_pct"]].tolist() == [120.0, 98.5]
    assert out[out["data"] != "pile"]["ours"].isna().all()
    assert beside_ours(rows, transfer, "blocks.2.hook_resid_pre")["ours"].isna().all()


def test_report_shows_the_published_section_only_for_study_pairs(tmp_path):
    page = build_report(tmp_path / "study", *MISTRAL).html.read_text()
    assert 'id="published"' in page and "published vs ours" in page and "98.86" in page and "Kissane" in page
    other = build_report(tmp_path / "other", synth.BASE, synth.CHAT).html.read_text()
    assert 'id="published"' not in other
