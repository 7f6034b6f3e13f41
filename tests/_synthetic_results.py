"""A results folder filled with hand-made rows of every table, for catalog and report tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sae_transfer.storage import tables

BASE, CHAT = "models/base", "models/chat"
HOOK = "blocks.2.hook_resid_pre"


def _metric(sae_model, model_id, policy, score, finetuned=None, segment="text", revision="sha256:x"):
    sae = {"models/base": "base-sae", "models/chat": "chat-sae"}[sae_model] + ("-ft" if finetuned else "")
    return dict(
        sae_id=f"{sae}:abc", sae_model=sae_model, sae_finetuned_from=finetuned, model_id=model_id,
        model_revision=revision, hook=HOOK, segment=segment, outlier_policy=policy, outlier_rule="absolute",
        outlier_threshold=10.0, scale_factor=1.5, n_tokens=1000, n_sequences=10, l0=20.0, mse=3.0,
        explained_variance=0.8, explained_variance_legacy=0.75, ce_clean=2.0, ce_sae=2.0 + (1 - score) * 6,
        ce_zero=8.0, ce_delta=(1 - score) * 6, ce_loss_score=score, ce_loss_score_lo=score - 0.01,
        ce_loss_score_hi=score + 0.01, ce_ci_level=0.95, kl_div_score=score, seed=0,
    )


def fill(root: Path) -> None:
    """Write one part per table under `root`."""
    fill_diffing(root)
    rows = []
    for policy in ("excluded", "included"):
        for sae_model in (BASE, CHAT):
            for model in (BASE, CHAT):
                rows.append(_metric(sae_model, model, policy, 0.97 if sae_model == model else 0.93))
        rows.append(_metric(BASE, CHAT, policy, 0.96, finetuned="base-sae:abc"))
    for segment in ("user_prompt", "rollout", "template"):
        rows.append(_metric(BASE, CHAT, "excluded", 0.9, segment=segment))
        rows.append(_metric(CHAT, CHAT, "excluded", 0.95, segment=segment))
    for step, score in ((30, 0.95), (60, 0.94)):
        rows.append(_metric(BASE, f"models/ckpt/step-{step:06d}", "excluded", score, revision=f"step-{step}"))
    tables.append_rows(root, "metrics", rows)
    tables.append_rows(root, "outlier_summary", [dict(
        model_id=m, model_revision="r", hook=HOOK, outlier_rule="absolute", outlier_threshold=10.0, n_tokens=1000,
        n_outliers=10, frac_outliers=0.01, frac_bos=1.0, frac_first10=0.0, frac_newline=0.0, frac_other=0.0,
    ) for m in (BASE, CHAT)])
    tables.append_rows(root, "token_errors", [dict(
        sae_id="base-sae:abc", sae_model=BASE, model_id=CHAT, hook=HOOK, seq_id=i, pos=i % 8,
        scaled_norm=1.0 + i, sq_error=0.5 * (1 + i), l0=5, is_outlier=i > 8,
    ) for i in range(10)])
    tables.append_rows(root, "weight_diff", [dict(
        base_model=BASE, chat_model=CHAT, param=f"model.layers.{layer}.self_attn.q_proj.weight", layer=layer,
        kind="q_proj", numel=16, base_norm=1.0, diff_norm=0.1 * (layer + 1), rel_diff=0.1 * (layer + 1),
    ) for layer in range(3)])
    tables.append_rows(root, "positions", [dict(
        sae_id="base-sae:abc", sae_model=BASE, model_id=CHAT, hook=HOOK, outlier_policy="excluded",
        sae_context_size=16, context_size=64, bucket_lo=lo, bucket_hi=2 * lo - 1 if lo > 1 else 1,
        beyond_training_context=lo >= 16, n_tokens=10, mse=1.0 + lo / 8, explained_variance=0.9 - lo / 100,
    ) for lo in (1, 2, 4, 8, 16, 32)])
    tables.append_rows(root, "checkpoints", [dict(
        checkpoint_id=f"c{step}", path=f"models/ckpt/step-{step:06d}", step=step, status="evaluated",
    ) for step in (30, 60)])
    log_dir = root / "saes" / "base-sae" / "training_log"
    log_dir.mkdir(parents=True)
    pq.write_table(pa.table({
        "step": [1, 2, 3], "tokens": [100, 200, 300], "lr": [1e-4] * 3, "loss": [3.0, 2.0, 1.0],
        "mse": [3.0, 2.0, 1.0], "l0": [50.0, 30.0, 20.0], "explained_variance": [0.1, 0.5, 0.7],
        "dead_fraction": [0.0, 0.0, 0.01],
    }), log_dir / "part-0.parquet")



def fill_diffing(root: Path) -> None:
    """Hand-made rows of the feature-level diffing tables (a crosscoder with one chat-only latent)."""
    cc = dict(dictionary="crosscoder-x:abc", dictionary_model=f"{BASE} + {CHAT}", hook=HOOK)
    classes = ["shared", "shared", "chat_only", "base_only", "changed"]
    tables.append_rows(root, "crosscoder_latents", [dict(
        cc, latent=j, norm_base=0.1 if c == "chat_only" else 1.0, norm_chat=1.0, rho=0.9 if c == "chat_only" else 0.5,
        delta_norm=0.5, dec_cos=0.1 if c == "changed" else 0.9, latent_class=c, chat_only_min=0.833, base_only_max=0.167,
        shared_min=0.444, shared_max=0.556, agree_min_cos=0.8, diff_norm=1.3 if c == "changed" else 0.1,
        chat_minus_base=[0.6, 0.8] if c == "changed" else [], fire_count=10, frequency=0.01, mean_act_firing=1.0,
        n_tokens=1000,
    ) for j, c in enumerate(classes)])
    diff = dict(hook=HOOK, base_model=BASE, chat_model=CHAT, n_tokens=1000, typical_diff_norm=0.5)
    tables.append_rows(root, "activation_diff", [
        dict(diff, kind="all", key="all", rank=0, count=1000, mean_diff_norm=0.6, norm_of_mean=0.1, mean_base_norm=4.0),
        dict(diff, kind="role", key="user", rank=0, count=400, mean_diff_norm=0.7, norm_of_mean=0.2, mean_base_norm=4.0),
        dict(diff, kind="position", key="0", rank=0, count=10, mean_diff_norm=2.0, norm_of_mean=1.9, mean_base_norm=40.0),
        dict(diff, kind="token", key="7", rank=0, token_id=7, token="<|user|>", count=40, mean_diff_norm=3.0,
             norm_of_mean=2.9, mean_base_norm=4.0, direction=[1.2, 1.6]),
        dict(diff, kind="token", key="9", rank=1, token_id=9, token="def", count=40, mean_diff_norm=0.5, norm_of_mean=0.1,
             mean_base_norm=4.0, direction=[0.1, 0.0]),
        dict(diff, kind="component", key="0", rank=0, component=0, variance=0.3, variance_share=0.6, direction=[0.6, 0.8]),
        dict(diff, kind="component_latent", key="0", rank=0, component=0, dictionary="chat-sae:abc", latent=1,
             latent_cos=0.93),
    ])
    tables.append_rows(root, "latent_scaling", [dict(
        cc, kind="crosscoder", latent=2, nu_error=0.05, nu_recon=0.1, verdict="specific", fire_count=10, n_tokens=1000)])
    tables.append_rows(root, "latent_examples", [dict(
        cc, model="paired", model_id=CHAT, latent=2, rank=r, activation=2.0 - r, seq_id=r, pos=3, window_start=0,
        token_ids=[1, 2, 3, 4], tokens=["<|user|>", "def", " f", "\n"], acts=[2.0 - r, 0.0, 0.1, 0.0], n_tokens=1000,
    ) for r in range(3)])
    for sae, model in (("base-sae:abc", BASE), ("chat-sae:abc", CHAT)):
        tables.append_rows(root, "latent_stats", [dict(
            dictionary=sae, dictionary_model=model, hook=HOOK, model=m, model_id=m, latent=j, n_tokens=1000,
            explained_variance=0.8, fire_count=5, frequency=0.005, log10_density=-2.3 - (j == 1 and m == "models/base") * 7,
            status="appears" if j == 1 else "shared", log10_density_shift=0.0, ev_drop=0.01,
        ) for j in range(3) for m in ("base", "chat")])
    tables.append_rows(root, "latent_matches", [dict(
        dictionary_a="base-sae:abc", dictionary_b="chat-sae:abc", hook=HOOK, latent_a=j, latent_b=j, dec_cos=0.95,
        act_corr=0.8, method="dense") for j in range(3)])
    tables.append_rows(root, "latent_drift", [dict(
        dictionary=f"ft{step}:abc", parent="base-sae:abc", hook=HOOK, latent=j, enc_cos=0.9, dec_cos=0.95 - 0.1 * j,
        dec_norm_ratio=1.1, step=step) for j in range(3) for step in (None, 30)])
    tables.append_rows(root, "latent_ablation", [dict(
        dictionary="chat-sae:abc", dictionary_model=CHAT, hook=HOOK, model_id=CHAT, latent_set=s, latents=[1], set_size=1,
        segment=seg, n_tokens=100, kl_mean=0.1 if s != "random" else 0.01, kl_max=1.0, ablated_norm_frac=0.1)
        for s in ("appears_on_chat", "random") for seg in ("user_prompt", "rollout", "template", "all")])
