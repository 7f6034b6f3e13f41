-- The study's main table: every SAE x model on plain text, with and without outliers.
-- r = s_eval / s_train: the SAE reconstructs SAE(r x) / r on the evaluated model (DESIGN.md "Scaling").
-- Parameters: ?1 base model id, ?2 chat model id.
with labelled as (
    select
        *,
        sae_label(sae_model, sae_finetuned_from, ?1, ?2) as sae_label,
        model_label(model_id, ?1, ?2) as model_label
    -- the view holds the newest row per (SAE, model, revision, hook, policy, segment)
    from metrics
    where segment = 'text'
)

select
    hook,
    outlier_policy,
    sae_label as sae,
    sae_variant as variant,
    model_label as model,
    round(l0, 1) as l0,
    round(100 * ce_loss_score, 2) as ce_loss_rec_pct,
    round(100 * ce_loss_score_lo, 2) as ce_rec_ci_lo,
    round(100 * ce_loss_score_hi, 2) as ce_rec_ci_hi,
    round(ce_clean, 3) as clean_ce,
    round(ce_sae, 3) as sae_ce,
    round(ce_delta, 3) as ce_delta,
    round(ce_zero, 3) as zero_abl_ce,
    round(100 * explained_variance, 1) as ev_pct,
    round(100 * explained_variance_legacy, 1) as ev_legacy_pct,
    round(mse, 2) as mse,
    round(kl_div_score, 4) as kl_div_score,
    round(scale_ratio, 3) as r,
    n_tokens,
    reliable,
    unreliable_reason
from labelled
where model_label in ('base', 'chat')
order by hook, outlier_policy desc, sae_label, sae_variant nulls first, model_label
