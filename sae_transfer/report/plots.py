"""Report figures (matplotlib, Agg backend), returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

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
            ax.scatter(part["scaled_norm"], part["sq_error"].clip(lower=1e-6), s=4, alpha=0.4, label=f"{sae} SAE",
                       color=_COLORS.get(sae))
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


def density_shift(df: pd.DataFrame) -> bytes:
    """log10 firing density on base vs chat of every SAE latent, coloured by status."""
    saes = sorted(df["sae"].unique())
    fig, axes = plt.subplots(1, max(len(saes), 1), figsize=(4.2 * max(len(saes), 1), 3.8), squeeze=False)
    colors = {"shared": "#999999", "appears": "#d62728", "dies": "#1f77b4", "dead": "#cccccc"}
    for ax, sae in zip(axes[0], saes):
        part = df[df["sae"] == sae]
        for status, rows in part.groupby("status"):
            ax.scatter(rows["log10_density_base"], rows["log10_density_chat"], s=5, alpha=0.6,
                       color=colors.get(status), label=f"{status} ({len(rows)})")
        lo = float(min(part["log10_density_base"].min(), part["log10_density_chat"].min()))
        ax.plot([lo, 0], [lo, 0], lw=0.8, color="black")
        ax.set_xlabel("log10 density on base")
        ax.set_ylabel("log10 density on chat")
        ax.set_title(f"{sae} SAE", fontsize=9)
        ax.legend(fontsize=7, markerscale=2)
    return _png(fig)


def decoder_cosines(df: pd.DataFrame) -> bytes:
    """Histograms of decoder cosines: crosscoder base vs chat decoders by class; SAE matches."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for source, part in df.groupby("source"):
        ax.hist(part["dec_cos"].dropna(), bins=40, range=(-1, 1), histtype="step", lw=1.4, label=f"{source} ({len(part)})")
    ax.set_xlabel("decoder cosine")
    ax.set_ylabel("latents")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    return _png(fig)


def scaling_ratios(df: pd.DataFrame) -> bytes:
    """Latent Scaling: nu_error vs nu_recon of the crosscoder's chat-only latents."""
    fig, ax = plt.subplots(figsize=(5, 4))
    colors = {"specific": "#d62728", "complete_shrinkage": "#1f77b4", "latent_decoupling": "#2ca02c", "inactive": "#999999"}
    for verdict, part in df.groupby("verdict"):
        ax.scatter(part["nu_recon"], part["nu_error"], s=18, color=colors.get(verdict), label=f"{verdict} ({len(part)})")
    ax.set_xlabel("nu_r = beta(recon base) / beta(recon chat)")
    ax.set_ylabel("nu_eps = beta(error base) / beta(error chat)")
    ax.axhline(0.3, lw=0.6, ls="--", color="black")
    ax.axvline(0.5, lw=0.6, ls="--", color="black")
    ax.legend(fontsize=7)
    return _png(fig)
