"""One sentence per research question, with its number and interval, from the report's tables.

Each function takes the DataFrame of one report query and returns a sentence, or None when the
study has no rows for that question yet. Rows flagged `reliable = false` are never quoted.
"""

from __future__ import annotations

import pandas as pd


def _pick(df: pd.DataFrame, **where) -> pd.Series | None:
    """The first row matching every column == value (None when there is none)."""
    if df.empty:
        return None
    mask = pd.Series(True, index=df.index)
    for col, value in where.items():
        if col not in df.columns:
            return None
        mask &= df[col] == value
    rows = df[mask]
    if "reliable" in rows.columns:
        rows = rows[rows["reliable"].fillna(True).astype(bool)]
    return rows.iloc[0] if len(rows) else None


def _score(row: pd.Series) -> str:
    """`92.5 % [91.8, 93.1]` from a transfer-table row."""
    ci = ""
    if pd.notna(row.get("ce_rec_ci_lo")) and pd.notna(row.get("ce_rec_ci_hi")):
        ci = f" [{row['ce_rec_ci_lo']:.1f}, {row['ce_rec_ci_hi']:.1f}]"
    return f"{row['ce_loss_rec_pct']:.1f} %{ci}"


def transfer_sentence(transfer: pd.DataFrame, on: str, policy: str = "excluded") -> str | None:
    """Does the other model's SAE work on `on` ("chat" or "base") as well as its own?"""
    other = "base" if on == "chat" else "chat"
    foreign = _pick(transfer, outlier_policy=policy, sae=other, model=on)
    own = _pick(transfer, outlier_policy=policy, sae=on, model=on)
    if foreign is None or own is None:
        return None
    gap = foreign["ce_loss_rec_pct"] - own["ce_loss_rec_pct"]
    return (f"On the {on} model the {other} SAE recovers {_score(foreign)} of CE loss vs {_score(own)} for the "
            f"{on} SAE ({gap:+.1f} points; L0 {foreign['l0']:.0f} vs {own['l0']:.0f}; outliers {policy}).")


def outlier_sentence(outliers: pd.DataFrame, transfer: pd.DataFrame) -> str | None:
    """How many tokens are outliers, what they are, and how much excluding them matters."""
    rows = outliers[outliers["rule"] == "absolute"] if "rule" in outliers.columns else outliers.iloc[0:0]
    if rows.empty:
        return None
    parts = [f"{r['frac_outliers']:.2%} on {r['model']}" for _, r in rows.iterrows()]
    top = rows.iloc[0]
    kinds = {k: top.get(f"{k}_pct") for k in ("bos", "first10", "newline", "other")}
    kinds = {k: v for k, v in kinds.items() if pd.notna(v)}
    mostly = f"; on {top['model']} they are mostly {max(kinds, key=kinds.get)} tokens" if kinds else ""
    text = f"Outlier-norm tokens (scaled norm > {top['threshold']:g}) are {', '.join(parts)}{mostly}."
    if not transfer.empty and {"outlier_policy", "ce_loss_rec_pct"} <= set(transfer.columns):
        wide = transfer.pivot_table(index=["sae", "model"], columns="outlier_policy", values="ce_loss_rec_pct")
        if {"excluded", "included"} <= set(wide.columns):
            text += f" Excluding them changes CE recovered by at most {(wide['excluded'] - wide['included']).abs().max():.2f} points."
    return text


def finetune_sentence(transfer: pd.DataFrame, finetune: pd.DataFrame, policy: str = "excluded") -> str | None:
    """How close does the cheaply fine-tuned base SAE get to the chat SAE on the chat model?"""
    ft = _pick(transfer, outlier_policy=policy, sae="fine-tuned base", model="chat")
    own = _pick(transfer, outlier_policy=policy, sae="chat", model="chat")
    if ft is None or own is None:
        return None
    tokens = {r["sae"]: r.get("train_tokens") for _, r in finetune.iterrows()} if not finetune.empty else {}
    n_ft, n_chat = tokens.get("fine-tuned base"), tokens.get("chat")
    budget = f" after {n_ft:,.0f} chat tokens ({n_ft / n_chat:.0%} of the chat SAE's budget)" if pd.notna(n_ft) and n_chat else ""
    return (f"Fine-tuned{budget}, the base SAE recovers {_score(ft)} on the chat model vs {_score(own)} for the chat "
            f"SAE trained from scratch.")


def segment_sentence(segments: pd.DataFrame, policy: str = "excluded") -> str | None:
    """Transfer on instruction data: rollout (assistant) and user-prompt tokens."""
    parts = []
    for seg, name in (("rollout", "rollout"), ("user_prompt", "user-prompt")):
        base = _pick(segments, segment=seg, outlier_policy=policy, sae="base")
        chat = _pick(segments, segment=seg, outlier_policy=policy, sae="chat")
        if base is not None and chat is not None:
            parts.append(f"{base['ce_loss_rec_pct']:.1f} % vs {chat['ce_loss_rec_pct']:.1f} % on {name} tokens")
    if not parts:
        return None
    skipped = segments[~segments["reliable"].fillna(True).astype(bool)]["segment"].unique() if "reliable" in segments else []
    note = f" ({', '.join(skipped)} rows are not findings: ill-conditioned denominators)" if len(skipped) else ""
    return f"On chat transcripts the base SAE recovers {'; '.join(parts)} for the chat SAE{note}."


def drift_sentence(drift: pd.DataFrame, policy: str = "excluded") -> str | None:
    """How the base SAE's transfer drifts across fine-tuning checkpoints."""
    rows = drift[(drift["outlier_policy"] == policy) & (drift["sae"] == "base")] if not drift.empty else drift
    if rows is None or len(rows) < 2:
        return None
    rows = rows.sort_values("step")
    first, last = rows.iloc[0], rows.iloc[-1]
    return (f"Across {len(rows)} checkpoints (steps {first['step']:.0f}–{last['step']:.0f}) the base SAE's CE loss "
            f"recovered goes from {100 * first['ce_loss_score']:.1f} % to {100 * last['ce_loss_score']:.1f} %.")


def diffing_sentence(classes: pd.DataFrame, status: pd.DataFrame, ablation: pd.DataFrame) -> str | None:
    """What changed inside: crosscoder classes, SAE latents that appear or die, the causal check."""
    parts = []
    if not classes.empty:
        n = {r["latent_class"]: int(r["n_latents"]) for _, r in classes.iterrows()}
        parts.append(f"the crosscoder calls {n.get('chat_only', 0)} of {sum(n.values())} live latents chat-only, "
                     f"{n.get('base_only', 0)} base-only and {n.get('shared', 0)} shared")
    base = status[status["sae"] == "base"] if not status.empty else status
    if len(base):
        r = base.iloc[0]
        parts.append(f"{int(r['appears_on_chat'])} base-SAE latents appear and {int(r['dies_on_chat'])} die on chat")
    every = ablation[ablation["segment"] == "all"] if not ablation.empty else ablation
    given, rand = every[every["latent_set"] != "random"], every[every["latent_set"] == "random"]
    if len(given) and len(rand):
        what = {"appears_on_chat": "latents that appear on chat", "density_shift": "latents with the largest density shift "
                "(none appears on chat)"}.get(given.iloc[0]["latent_set"], given.iloc[0]["latent_set"])
        parts.append(f"ablating {int(given.iloc[0]['set_size'])} {what} costs KL "
                     f"{given.iloc[0]['kl_mean']:.2g} nats/token vs {rand.iloc[0]['kl_mean']:.2g} for a random set")
    return ("What changed inside: " + "; ".join(parts) + ".") if parts else None


def findings(transfer, outliers, segments, finetune, drift, diffing=None) -> list[str]:
    """Every sentence the results support, in the order of DESIGN.md's research questions;
    `diffing` is (class counts, SAE latent status counts, causal-check table) when present."""
    out = [transfer_sentence(transfer, "chat"), transfer_sentence(transfer, "base"),
           outlier_sentence(outliers, transfer), finetune_sentence(transfer, finetune),
           segment_sentence(segments), drift_sentence(drift), diffing_sentence(*diffing) if diffing else None]
    return [s for s in out if s]
