-- Per SAE latent: log10 firing density on base vs chat, and the latent's status (shared, dies,
-- appears, dead). Parameters: ?1 base model id, ?2 chat model id.
with latest as (
    select *
    from latent_stats
    qualify row_number() over (partition by dictionary, latent, model order by created_at desc) = 1
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
