-- ||W_chat - W_base|| / ||W_base|| per layer and weight matrix (the view holds the newest diff of each pair).
select layer, kind, param, numel, round(rel_diff, 6) as rel_diff
from weight_diff
order by layer nulls first, kind
