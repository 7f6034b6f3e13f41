-- ||W_chat - W_base|| / ||W_base|| per layer and weight matrix.
with latest as (
    select *
    from weight_diff
    qualify row_number() over (partition by base_model, chat_model, param order by created_at desc) = 1
)

select layer, kind, param, numel, round(rel_diff, 6) as rel_diff
from latest
order by layer nulls first, kind
