"""Report figures (matplotlib, Agg backend), returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

_COLORS = {"base": "#1f77b4", "chat": "#d62728", "fine-tuned base": "#2ca02c"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def mse_vs_norm(df: pd.DataFrame) -> bytes:
    """Scatter of per-token squared error vs scaled norm, one panel per evaluated model, log y."""
    models = sorted(df["model"].unique())
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(5.5 * max(len(models), 1), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for sae, part in df[df["model"] == model].groupby("sae"):
            ax.scatter(part["scaled_norm"], part["sq_error"].clip(lower=1e-6), s=4, alpha=0.4, label=f"{sae} SAE", color=_COLORS.get(sae))
        ax.set_yscale("log")
        ax.set_xlabel("scaled activation norm")
        ax.set_ylabel("squared reconstruction error")
        ax.set_title(f"{model} model activations")
        ax.legend(markerscale=3)
    return _png(fig)


def weight_diff(df: pd.DataFrame) -> bytes:
    """Bars of ||W_chat - W_base|| / ||W_base|| per layer and matrix kind."""
    fig, ax = plt.subplots(figsize=(10, 4))
    layered = df[df["layer"].notna()]
    if not layered.empty:
        pivot = layered.pivot_table(index="layer", columns="kind", values="rel_diff", aggfunc="mean")
        pivot.plot.bar(ax=ax, width=0.85)
    ax.set_ylabel("relative Frobenius difference")
    ax.set_title("Chat vs base weights per layer")
    ax.legend(fontsize=7, ncol=4)
    return _png(fig)


def position_curves(df: pd.DataFrame) -> bytes:
    """Explained variance and MSE by position bucket for each (SAE, model), longest context."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    longest = df[df["context_size"] == df["context_size"].max()]
    for (sae, model), part in longest.groupby(["sae", "model"]):
        mid = (part["bucket_lo"] + part["bucket_hi"]) / 2
        style = "-" if model == "chat" else "--"
        axes[0].plot(mid, part["explained_variance"], style, marker="o", label=f"{sae} SAE on {model}", color=_COLORS.get(sae))
        axes[1].plot(mid, part["mse"], style, marker="o", label=f"{sae} SAE on {model}", color=_COLORS.get(sae))
    if not longest.empty:
        for ax in axes:
            ax.axvline(longest["sae_context_size"].iloc[0], color="grey", linestyle=":", label="SAE training context")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("position")
    axes[0].set_ylabel("explained variance")
    axes[1].set_ylabel("MSE (scaled)")
    axes[0].legend(fontsize=7)
    return _png(fig)


def training_curves(df: pd.DataFrame) -> bytes:
    """Loss, L0 and explained variance against tokens for every training run."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run, part in df.groupby("sae_id"):
        for ax, column in zip(axes, ["mse", "l0", "explained_variance"]):
            ax.plot(part["tokens"], part[column], label=run[:40])
    for ax, title in zip(axes, ["MSE", "L0", "explained variance"]):
        ax.set_title(title)
        ax.set_xlabel("tokens")
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=6)
    return _png(fig)


def drift(df: pd.DataFrame) -> bytes:
    """CE loss recovered and explained variance of each SAE across fine-tuning checkpoints."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for sae, part in df.groupby("sae"):
        part = part.sort_values("step")
        axes[0].plot(part["step"], part["ce_loss_score"], marker="o", label=f"{sae} SAE", color=_COLORS.get(sae))
        axes[1].plot(part["step"], part["explained_variance"], marker="o", label=f"{sae} SAE", color=_COLORS.get(sae))
    axes[0].set_ylabel("CE loss recovered")
    axes[1].set_ylabel("explained variance")
    for ax in axes:
        ax.set_xlabel("chat fine-tuning step (0 = base model)")
        ax.legend(fontsize=8)
    return _png(fig)


def transfer_heatmap(df: pd.DataFrame, policy: str = "excluded") -> bytes:
    """CE loss recovered (%) of every SAE (rows) on every model (columns), one panel per hook."""
    rows = df[df["outlier_policy"] == policy]
    hooks = sorted(rows["hook"].unique())
    fig, axes = plt.subplots(1, max(len(hooks), 1), figsize=(4.8 * max(len(hooks), 1), 3.2), squeeze=False)
    for ax, hook in zip(axes[0], hooks):
        grid = rows[rows["hook"] == hook].pivot_table(index="sae", columns="model", values="ce_loss_rec_pct")
        im = ax.imshow(grid.values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(grid.columns)), [f"on {c}" for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [f"{i} SAE" for i in grid.index])
        for (i, j), v in pd.DataFrame(grid.values).stack().items():
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v < grid.values.mean() else "black")
        ax.set_title(f"CE loss recovered (%), {hook}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)
