-- Per-token reconstruction error vs scaled norm (the study's "MSE vs norm" scatter).
-- Parameters: ?1 base model id, ?2 chat model id, ?3 max rows per (SAE, model).
with labelled as (
    select
        hook,
        sae_label(sae_model, sae_finetuned_from, ?1, ?2) as sae,
        model_label(model_id, ?1, ?2) as model,
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
