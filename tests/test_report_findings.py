"""Findings sentences compare like with like: hand-made report tables for every research
question, each sentence checked word for word, with unreliable and missing rows."""

from __future__ import annotations

import pandas as pd

from sae_transfer.report.findings import (
    drift_sentences,
    findings,
    finetune_sentences,
    outlier_sentence,
    segment_sentences,
    transfer_sentences,
)

HOOK, HOOK2 = "blocks.2.hook_resid_pre", "blocks.3.hook_resid_pre"


def _transfer_row(sae, model, pct, policy="excluded", hook=HOOK, reliable=True, reason=None, l0=50.0):
    return {"hook": hook, "outlier_policy": policy, "sae": sae, "model": model, "l0": l0, "ce_loss_rec_pct": pct,
            "ce_rec_ci_lo": pct - 1, "ce_rec_ci_hi": pct + 1, "reliable": reliable, "unreliable_reason": reason}


def _transfer(*extra) -> pd.DataFrame:
    rows = [_transfer_row("base", "chat", 90.0), _transfer_row("chat", "chat", 95.0),
            _transfer_row("base", "base", 97.0), _transfer_row("chat", "base", 92.0),
            _transfer_row("fine-tuned base", "chat", 94.0),
            # included-outlier rows and another hook's rows must never be mixed into the sentences above
            _transfer_row("base", "chat", 10.0, policy="included"), _transfer_row("chat", "chat", 20.0, policy="included"),
            *extra]
    return pd.DataFrame(rows)


def _segments(rollout_reliable=True, prompt_reliable=True) -> pd.DataFrame:
    def row(seg, sae, pct, reliable, policy="excluded"):
        return {"hook": HOOK, "segment": seg, "outlier_policy": policy, "sae": sae, "ce_loss_rec_pct": pct,
                "reliable": reliable, "unreliable_reason": None if reliable else "clean CE gap too small"}

    return pd.DataFrame([
        row("rollout", "base", 80.0, rollout_reliable), row("rollout", "chat", 85.0, rollout_reliable),
        row("user_prompt", "base", 86.9, prompt_reliable), row("user_prompt", "chat", 88.0, prompt_reliable),
        row("template", "base", 10.0, True), row("rollout", "base", 1.0, True, policy="included"),
    ])


def test_transfer_compares_one_model_policy_and_hook():
    assert transfer_sentences(_transfer(), "chat") == [
        "On the chat model (plain text, outliers excluded) the base SAE recovers 90.0 % [89.0, 91.0] of CE loss vs "
        "95.0 % [94.0, 96.0] for the chat SAE (-5.0 points; L0 50 vs 50)."]
    assert transfer_sentences(_transfer(), "base")[0].startswith(
        "On the base model (plain text, outliers excluded) the chat SAE recovers 92.0 % [91.0, 93.0] of CE loss vs 97.0 %")


def test_transfer_with_two_hooks_names_each_and_never_mixes_them():
    other = [_transfer_row("base", "chat", 60.0, hook=HOOK2), _transfer_row("chat", "chat", 70.0, hook=HOOK2)]
    got = transfer_sentences(_transfer(*other), "chat")
    assert len(got) == 2 and got[0].startswith(f"At {HOOK}, on the chat model") and "90.0 %" in got[0] and "95.0 %" in got[0]
    assert got[1].startswith(f"At {HOOK2}, on the chat model") and "60.0 %" in got[1] and "70.0 %" in got[1]


def test_unreliable_transfer_row_is_named_not_quoted():
    df = _transfer()
    df.loc[(df.sae == "base") & (df.model == "chat"), ["reliable", "unreliable_reason"]] = [False, "only 12 tokens"]
    got = transfer_sentences(df, "chat")
    assert got == ["On the chat model (plain text, outliers excluded) the base-vs-chat SAE comparison is not a finding: "
                   "the base SAE's row is not a finding (only 12 tokens)."]


def test_missing_side_gives_no_sentence():
    assert transfer_sentences(_transfer().query("sae != 'chat'"), "chat") == []
    assert transfer_sentences(pd.DataFrame(), "chat") == []


def test_finetune_compares_on_the_chat_model():
    finetune = pd.DataFrame([{"sae": "fine-tuned base", "train_tokens": 100_000}, {"sae": "chat", "train_tokens": 1_200_000}])
    assert finetune_sentences(_transfer(), finetune) == [
        "Fine-tuned after 100,000 chat tokens (8% of the chat SAE's budget), the base SAE recovers 94.0 % [93.0, 95.0] on "
        "the chat model vs 95.0 % [94.0, 96.0] for the chat SAE trained from scratch (plain text, outliers excluded)."]


def test_segments_compare_the_same_segment():
    assert segment_sentences(_segments()) == [
        "On the chat model's greedy transcripts (outliers excluded), on rollout tokens the base SAE recovers 80.0 % of CE "
        "loss vs 85.0 % for the chat SAE; on user-prompt tokens the base SAE recovers 86.9 % of CE loss vs 88.0 % for the "
        "chat SAE."]


def test_segments_without_reliable_rollout_rows_say_so():
    # the sentence the degenerate-rollout demo wrote compared user-prompt rows but read as a rollout finding
    got = segment_sentences(_segments(rollout_reliable=False))
    assert got == [
        "On the chat model's greedy transcripts (outliers excluded), on user-prompt tokens the base SAE recovers 86.9 % "
        "of CE loss vs 88.0 % for the chat SAE (not findings: rollout tokens: the base SAE's row is not a finding (clean CE "
        "gap too small); the chat SAE's row is not a finding (clean CE gap too small))."]
    none = segment_sentences(_segments(rollout_reliable=False, prompt_reliable=False))
    assert (len(none) == 1 and "no segment comparison is a finding: rollout tokens:" in none[0]
            and "user-prompt tokens:" in none[0])


def test_outliers_and_policy_difference_per_hook():
    outliers = pd.DataFrame([{"model": "chat", "rule": "absolute", "threshold": 20.0, "frac_outliers": 0.008,
                              "bos_pct": 90.0, "first10_pct": 5.0, "newline_pct": 3.0, "other_pct": 2.0}])
    text = outlier_sentence(outliers, _transfer())
    assert text == ("Outlier-norm tokens (scaled norm > 20) are 0.80% on chat; on chat they are mostly bos tokens. Excluding "
                    "them changes CE recovered (same SAE, model and hook) by at most 80.00 points.")


def test_drift_per_hook_and_policy():
    drift = pd.DataFrame([
        {"hook": HOOK, "outlier_policy": "excluded", "sae": "base", "step": s, "ce_loss_score": v}
        for s, v in ((0, 0.97), (100, 0.93), (200, 0.90))
    ] + [{"hook": HOOK, "outlier_policy": "included", "sae": "base", "step": 300, "ce_loss_score": 0.1}])
    assert drift_sentences(drift) == [
        "Across 3 checkpoints (steps 0–200) the base SAE's CE loss recovered goes from 97.0 % to 90.0 % (plain text, "
        "outliers excluded)."]


def test_findings_in_question_order():
    empty = pd.DataFrame()
    got = findings(_transfer(), empty, _segments(rollout_reliable=False), empty, empty)
    assert [s.split(" ")[0:4] for s in got] == [
        ["On", "the", "chat", "model"], ["On", "the", "base", "model"], ["Fine-tuned,", "the", "base", "SAE"],
        ["On", "the", "chat", "model's"]]
