-- How many latents of each study SAE die, appear, stay shared or are dead between base and chat.
-- Parameters: ?1 base model id, ?2 chat model id.
with latest as (
    select *
    from latent_stats
    where model = 'chat'
    -- the newest dictionary per study SAE label (a retrained SAE appends a new one)
    qualify created_at = max(created_at) over (partition by hook, dictionary_label(dictionary, dictionary_model, ?1, ?2))
)

select
    dictionary_label(dictionary, dictionary_model, ?1, ?2) as sae,
    count(*) filter (where status = 'shared') as shared,
    count(*) filter (where status = 'appears') as appears_on_chat,
    count(*) filter (where status = 'dies') as dies_on_chat,
    count(*) filter (where status = 'dead') as dead,
    round(any_value(explained_variance), 3) as ev_on_chat
from latest
group by all
order by sae
