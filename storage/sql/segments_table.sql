-- Instruction-formatted data: transfer per segment (splice only at that segment's positions).
-- ce_loss_rec_segment_pct uses the segment-only zero ablation (the seed study's Alpaca numbers);
-- scale factor and threshold come from the main corpus. Parameters: ?1 base model id, ?2 chat model id.
with labelled as (
    select
        *,
        sae_label(sae_model, sae_finetuned_from, ?1, ?2) as sae_label
    from metrics
    where segment <> 'text'
),

latest as (
    -- the view keeps one row per model revision; the table shows each model's newest
    select *
    from labelled
    qualify row_number() over (
        partition by sae_id, model_id, hook, segment, outlier_policy order by created_at desc
    ) = 1
)

select
    hook,
    segment,
    outlier_policy,
    sae_label as sae,
    round(l0, 1) as l0,
    round(100 * ce_loss_score, 2) as ce_loss_rec_pct,
    round(ce_clean, 3) as clean_ce,
    round(ce_sae, 3) as sae_ce,
    round(ce_delta, 3) as ce_delta,
    round(ce_zero, 3) as zero_abl_ce,
    round(ce_zero_segment, 3) as zero_abl_segment_ce,
    round(100 * ce_loss_score_segment, 2) as ce_loss_rec_segment_pct,
    round(100 * explained_variance_legacy, 1) as ev_legacy_pct,
    round(mse, 2) as mse,
    round(scale_ratio, 3) as r,
    n_tokens,
    reliable,
    unreliable_reason
from latest
where same_model(model_id, ?2)
order by hook, segment, outlier_policy desc, sae_label
