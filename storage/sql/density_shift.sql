-- Per SAE latent: log10 firing density on base vs chat, and the latent's status (shared, dies,
-- appears, dead). Parameters: ?1 base model id, ?2 chat model id.
with latest as (
    select *
    from latent_stats
    -- the newest dictionary per study SAE label (a retrained SAE appends a new one)
    qualify created_at = max(created_at) over (partition by hook, dictionary_label(dictionary, dictionary_model, ?1, ?2))
),

wide as (
    select
        dictionary,
        any_value(dictionary_model) as dictionary_model,
        latent,
        any_value(status) as status,
        max(log10_density) filter (where model = 'base') as log10_density_base,
        max(log10_density) filter (where model = 'chat') as log10_density_chat,
        max(ev_drop) filter (where model = 'chat') as ev_drop_chat
    from latest
    group by dictionary, latent
)

select
    dictionary_label(dictionary, dictionary_model, ?1, ?2) as sae,
    latent,
    status,
    log10_density_base,
    log10_density_chat,
    ev_drop_chat
from wide
order by sae, latent
