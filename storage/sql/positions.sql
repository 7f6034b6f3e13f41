-- MSE and explained variance by position bucket, past the SAE's training context.
-- Parameters: ?1 base model id, ?2 chat model id.
with latest as (
    -- the view keeps each model revision's curves; the plot shows each model's newest
    select *
    from positions
    where outlier_policy = 'excluded'
    qualify row_number() over (
        partition by sae_id, model_id, hook, context_size, bucket_lo order by created_at desc
    ) = 1
)

select
    hook,
    sae_label(sae_model, sae_finetuned_from, ?1, ?2) as sae,
    model_label(model_id, ?1, ?2) as model,
    context_size,
    sae_context_size,
    bucket_lo,
    bucket_hi,
    beyond_training_context,
    n_tokens,
    mse,
    explained_variance
from latest
order by hook, sae, model, context_size, bucket_lo
