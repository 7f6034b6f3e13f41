-- Per-token reconstruction error vs scaled norm (the study's "MSE vs norm" scatter).
-- Parameters: ?1 base model id, ?2 chat model id, ?3 max rows per (SAE, model).
with labelled as (
    select
        hook,
        case when sae_finetuned_from is not null then 'fine-tuned base' when same_model(sae_model, ?1) then 'base' when same_model(sae_model, ?2) then 'chat' else sae_model end as sae,
        case when same_model(model_id, ?1) then 'base' when same_model(model_id, ?2) then 'chat' else model_id end as model,
        scaled_norm,
        sq_error,
        is_outlier
    from token_errors
),

sampled as (
    select *, row_number() over (partition by hook, sae, model order by hash(scaled_norm, sq_error)) as rn
    from labelled
)

select hook, sae, model, scaled_norm, sq_error, is_outlier
from sampled
where rn <= ?3 and model in ('base', 'chat')
