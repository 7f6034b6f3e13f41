-- Drift across fine-tuning checkpoints: how each SAE does on each checkpoint.
-- Parameters: ?1 base model id, ?2 chat model id.
with evaluated as (
    select c.path, max(c.step) as step
    from checkpoints as c
    group by c.path
),

rows as (
    select
        m.hook,
        m.outlier_policy,
        sae_label(m.sae_model, m.sae_finetuned_from, ?1, ?2) as sae,
        coalesce(e.step, case when same_model(m.model_id, ?1) then 0 end) as step,
        m.ce_loss_score,
        m.explained_variance,
        m.created_at
    from metrics as m
    left join evaluated as e on e.path = m.model_id
    where m.segment = 'text'
)

select hook, outlier_policy, sae, step, ce_loss_score, explained_variance
from rows
where step is not null
-- the newest SAE of each label (a retrained SAE has a new id, which the view keeps beside the old)
qualify row_number() over (partition by hook, outlier_policy, sae, step order by created_at desc) = 1
order by hook, outlier_policy, sae, step
