-- Tokens whose activation moves most from base to chat on the same text (mean ||chat - base||,
-- raw model units), with how far they stand out from the typical token. Parameters: ?1 base model
-- id, ?2 chat model id.
with latest as (
    select *
    from activation_diff
    where kind = 'token' and same_model(base_model, ?1) and same_model(chat_model, ?2)
    qualify created_at = max(created_at) over (partition by hook)
)

select
    hook,
    rank,
    token_id,
    coalesce(token, cast(token_id as varchar)) as token,
    count,
    round(mean_diff_norm, 4) as mean_diff_norm,
    round(norm_of_mean / nullif(mean_diff_norm, 0), 3) as consistency,
    round(mean_diff_norm / nullif(mean_base_norm, 0), 3) as rel_to_activation,
    round(mean_diff_norm / nullif(typical_diff_norm, 0), 2) as rel_to_typical
from latest
order by hook, rank
