"""One sentence per research question, with its number and interval, from the report's tables.

Each function takes the DataFrame of one report query and returns a sentence, or None when the
study has no rows for that question yet. Rows flagged `reliable = false` are never quoted.
"""

from __future__ import annotations

import pandas as pd


def _rows(df: pd.DataFrame, **where) -> pd.DataFrame:
    """The rows matching every column == value (none when a column is missing)."""
    if df.empty or not set(where) <= set(df.columns):
        return df.iloc[0:0]
    mask = pd.Series(True, index=df.index)
    for col, value in where.items():
        mask &= df[col] == value
    return df[mask]


def _reliable(row: pd.Series) -> bool:
    return bool(row["reliable"]) if "reliable" in row and pd.notna(row["reliable"]) else True


def _why(row: pd.Series, label: str) -> str:
    reason = row.get("unreliable_reason")
    return f"the {label} SAE's row is not a finding ({reason})" if pd.notna(reason) and reason else \
        f"the {label} SAE's row is not a finding"


def _hooks(df: pd.DataFrame) -> list:
    """Hooks present, in order; [None] for a table without a hook column."""
    return sorted(df["hook"].dropna().unique()) if "hook" in df.columns and not df.empty else [None]


def _pair(df: pd.DataFrame, hook, a: dict, b: dict) -> tuple[pd.Series, pd.Series] | str | None:
    """Rows a and b at the same hook (and whatever else `a` and `b` share), or a reason neither
    is quoted (one is not reliable), or None when either is missing."""
    at = {"hook": hook} if hook is not None else {}
    ra, rb = _rows(df, **at, **a), _rows(df, **at, **b)
    if ra.empty or rb.empty:
        return None
    ra, rb = ra.iloc[0], rb.iloc[0]
    bad = [_why(r, r["sae"]) for r in (ra, rb) if not _reliable(r)]
    return "; ".join(bad) if bad else (ra, rb)


def _at(hook, hooks: list) -> str:
    """"At blocks.2.hook_resid_pre, " when the study has several hooks, else nothing."""
    return f"At {hook}, " if hook is not None and len(hooks) > 1 else ""


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _score(row: pd.Series) -> str:
    """`92.5 % [91.8, 93.1]` from a transfer-table row."""
    ci = ""
    if pd.notna(row.get("ce_rec_ci_lo")) and pd.notna(row.get("ce_rec_ci_hi")):
        ci = f" [{row['ce_rec_ci_lo']:.1f}, {row['ce_rec_ci_hi']:.1f}]"
    return f"{row['ce_loss_rec_pct']:.1f} %{ci}"


def transfer_sentences(transfer: pd.DataFrame, on: str, policy: str = "excluded") -> list[str]:
    """Does the other model's SAE work on `on` ("chat" or "base") as well as its own? Both rows:
    the same model, hook, plain text and outlier policy."""
    other = "base" if on == "chat" else "chat"
    hooks, out = _hooks(transfer), []
    for hook in hooks:
        pair = _pair(transfer, hook, {"outlier_policy": policy, "sae": other, "model": on},
                     {"outlier_policy": policy, "sae": on, "model": on})
        what = f"on the {on} model (plain text, outliers {policy})"
        if isinstance(pair, str):
            out.append(_cap(f"{_at(hook, hooks)}{what} the {other}-vs-{on} SAE comparison is not a finding: {pair}."))
        elif pair is not None:
            foreign, own = pair
            gap = foreign["ce_loss_rec_pct"] - own["ce_loss_rec_pct"]
            out.append(_cap(f"{_at(hook, hooks)}{what} the {other} SAE recovers {_score(foreign)} of CE loss vs "
                            f"{_score(own)} for the {on} SAE ({gap:+.1f} points; L0 {foreign['l0']:.0f} vs "
                            f"{own['l0']:.0f})."))
    return out


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
        index = [c for c in ("hook", "sae", "model") if c in transfer.columns]
        wide = transfer.pivot_table(index=index, columns="outlier_policy", values="ce_loss_rec_pct")
        if {"excluded", "included"} <= set(wide.columns):
            text += (" Excluding them changes CE recovered (same SAE, model and hook) by at most "
                     f"{(wide['excluded'] - wide['included']).abs().max():.2f} points.")
    return text


def finetune_sentences(transfer: pd.DataFrame, finetune: pd.DataFrame, policy: str = "excluded") -> list[str]:
    """How close does the cheaply fine-tuned base SAE get to the chat SAE on the chat model
    (same hook, plain text, outlier policy)?"""
    tokens = {r["sae"]: r.get("train_tokens") for _, r in finetune.iterrows()} if not finetune.empty else {}
    n_ft, n_chat = tokens.get("fine-tuned base"), tokens.get("chat")
    budget = f" after {n_ft:,.0f} chat tokens ({n_ft / n_chat:.0%} of the chat SAE's budget)" if pd.notna(n_ft) and n_chat else ""
    hooks, out = _hooks(transfer), []
    for hook in hooks:
        pair = _pair(transfer, hook, {"outlier_policy": policy, "sae": "fine-tuned base", "model": "chat"},
                     {"outlier_policy": policy, "sae": "chat", "model": "chat"})
        if isinstance(pair, str):
            out.append(f"{_at(hook, hooks)}the fine-tuned-vs-chat SAE comparison on the chat model (plain text, outliers "
                       f"{policy}) is not a finding: {pair}.")
        elif pair is not None:
            ft, own = pair
            out.append(f"{_at(hook, hooks)}fine-tuned{budget}, the base SAE recovers {_score(ft)} on the chat model "
                       f"vs {_score(own)} for the chat SAE trained from scratch (plain text, outliers {policy}).")
    return [_cap(s) for s in out]


SEGMENT_NAMES = {"rollout": "rollout", "user_prompt": "user-prompt"}


def segment_sentences(segments: pd.DataFrame, policy: str = "excluded") -> list[str]:
    """Transfer on instruction data: per segment (rollout, user prompt), the base SAE against
    the chat SAE on the same segment, hook and outlier policy of the chat model's transcripts."""
    hooks, out = _hooks(segments), []
    for hook in hooks:
        found, skipped = [], []
        for seg, name in SEGMENT_NAMES.items():
            pair = _pair(segments, hook, {"segment": seg, "outlier_policy": policy, "sae": "base"},
                         {"segment": seg, "outlier_policy": policy, "sae": "chat"})
            if isinstance(pair, str):
                skipped.append(f"{name} tokens: {pair}")
            elif pair is not None:
                base, chat = pair
                found.append(f"on {name} tokens the base SAE recovers {base['ce_loss_rec_pct']:.1f} % of CE loss vs "
                             f"{chat['ce_loss_rec_pct']:.1f} % for the chat SAE")
        if not found and not skipped:
            continue
        what = f"{_at(hook, hooks)}on the chat model's greedy transcripts (outliers {policy})"
        if found:
            text = f"{what}, {'; '.join(found)}"
            text += f" (not findings: {'; '.join(skipped)})." if skipped else "."
        else:
            text = f"{what} no segment comparison is a finding: {'; '.join(skipped)}."
        out.append(_cap(text))
    return out


def drift_sentences(drift: pd.DataFrame, policy: str = "excluded") -> list[str]:
    """How the base SAE's transfer (plain text, one hook, one policy) drifts across checkpoints."""
    hooks, out = _hooks(drift), []
    for hook in hooks:
        at = {"hook": hook} if hook is not None else {}
        rows = _rows(drift, **at, outlier_policy=policy, sae="base")
        if len(rows) < 2:
            continue
        rows = rows.sort_values("step")
        first, last = rows.iloc[0], rows.iloc[-1]
        out.append(_cap(f"{_at(hook, hooks)}across {len(rows)} checkpoints (steps {first['step']:.0f}–{last['step']:.0f}) "
                        f"the base SAE's CE loss recovered goes from {100 * first['ce_loss_score']:.1f} % to "
                        f"{100 * last['ce_loss_score']:.1f} % (plain text, outliers {policy})."))
    return out


def diffing_sentence(classes: pd.DataFrame, status: pd.DataFrame, ablation: pd.DataFrame,
                     agreement: pd.DataFrame | None = None, top_tokens: pd.DataFrame | None = None) -> str | None:
    """What changed inside: crosscoder classes (with a warning when its balanced-norm latents'
    decoders disagree), the activation difference's top token, SAE latents that appear or die,
    the causal check."""
    parts = []
    if not classes.empty:
        n = {r["latent_class"]: int(r["n_latents"]) for _, r in classes.iterrows()}
        parts.append(f"the crosscoder calls {n.get('chat_only', 0)} of {sum(n.values())} live latents chat-only, "
                     f"{n.get('base_only', 0)} base-only, {n.get('shared', 0)} shared and {n.get('changed', 0)} changed "
                     "(both decoders alive, pointing apart)")
    bad = agreement[agreement["disagree"].fillna(False).astype(bool)] if agreement is not None and not agreement.empty else None
    if bad is not None and len(bad):
        r = bad.iloc[0]
        parts.append(f"but its decoders disagree on {int(r['n_disagree'])} of {int(r['n_balanced'])} latents with balanced "
                     f"norms (median cosine {r['median_dec_cos']:.2f}), the mark of an under-trained crosscoder: "
                     "its shared/changed split is not a finding")
    blind = (agreement[agreement["misses_difference"].fillna(False).astype(bool)]
             if agreement is not None and not agreement.empty and "misses_difference" in agreement else None)
    if blind is not None and len(blind):
        parts.append(f"its reconstructions reproduce only {100 * blind.iloc[0]['diff_explained']:.0f} % of the variance "
                     "of the activation difference chat - base, so it has not learnt where the models differ and "
                     "its classes are not a finding")
    moved = top_tokens[top_tokens["mean_diff_norm"] > 0] if top_tokens is not None and not top_tokens.empty else None
    if moved is not None and len(moved):  # identical models: no token moved, nothing to name
        r = moved.iloc[0]
        typical = "" if pd.isna(r["rel_to_typical"]) else f", {r['rel_to_typical']:.1f}x the typical token"
        parts.append(f"the token whose activation moves most from base to chat is {r['token']!r} "
                     f"(mean ||chat - base|| {r['mean_diff_norm']:.3g}{typical})")
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
    """Every sentence the results support, in the order of the research questions (transfer each
    way, outliers, fine-tuning, instruction data, drift, what changed inside); `diffing` is
    (class counts, SAE latent status counts, causal-check table[, crosscoder agreement[, top
    activation-difference tokens]]) when present. Each sentence
    compares rows of one segment, hook and outlier policy, and says which."""
    out = [*transfer_sentences(transfer, "chat"), *transfer_sentences(transfer, "base"),
           outlier_sentence(outliers, transfer), *finetune_sentences(transfer, finetune),
           *segment_sentences(segments), *drift_sentences(drift), diffing_sentence(*diffing) if diffing else None]
    return [s for s in out if s]
