-- Every study SAE on every fine-tuning checkpoint evaluated so far (plain text): the table a
-- checkpoint evaluation publishes, the newest checkpoint beside the drift before it.
-- Checkpoint rows are the metrics rows whose model_revision is a `step-N` label.
-- Parameters: ?1 base model id, ?2 chat model id.
with checkpoint_rows as (
    select
        m.hook,
        m.outlier_policy,
        sae_label(m.sae_model, m.sae_finetuned_from, ?1, ?2) as sae,
        cast(regexp_extract(m.model_revision, '^step-([0-9]+)$', 1) as bigint) as step,
        m.model_id,
        m.l0,
        m.ce_loss_score,
        m.explained_variance,
        m.mse,
        m.created_at
    from metrics as m
    where m.segment = 'text' and regexp_matches(m.model_revision, '^step-[0-9]+$')
),

latest as (
    -- the newest SAE of each label (a retrained SAE has a new id, which the view keeps beside the old)
    select *
    from checkpoint_rows
    qualify row_number() over (partition by hook, outlier_policy, sae, step order by created_at desc) = 1
)

select hook, outlier_policy, sae, step, model_id, l0, ce_loss_score, explained_variance, mse
from latest
order by hook, outlier_policy, sae, step
