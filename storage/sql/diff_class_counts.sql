-- Crosscoder latents by class (relative decoder norm rho; cut-offs recorded per row), counting
-- only latents that fired on the paired tokens. Parameters: none.
with latest as (
    -- the newest crosscoder per hook (re-runs with other settings append new dictionaries)
    select *
    from crosscoder_latents
    qualify created_at = max(created_at) over (partition by hook)
)

select
    hook,
    latent_class,
    count(*) filter (where fire_count > 0) as n_latents,
    count(*) filter (where fire_count = 0) as n_dead,
    round(median(dec_cos) filter (where fire_count > 0), 3) as median_dec_cos,
    round(avg(frequency) filter (where fire_count > 0), 5) as mean_frequency,
    any_value(round(chat_only_min, 3)) as chat_only_rho_min,
    any_value(round(base_only_max, 3)) as base_only_rho_max
from latest
group by hook, latent_class
order by hook, latent_class
