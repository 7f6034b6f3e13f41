-- Causal check: KL(clean || ablated) of the chat model per segment, for the chat SAE's latents
-- that appear on chat and for a random set of the same size. Parameters: none.
with latest as (
    -- the newest run at each hook (the view keeps the newest of every dictionary)
    select *
    from latent_ablation
    qualify created_at = max(created_at) over (partition by hook)
)

select
    segment,
    latent_set,
    set_size,
    n_tokens,
    round(kl_mean, 5) as kl_mean,
    round(kl_max, 4) as kl_max,
    round(ablated_norm_frac, 4) as ablated_norm_frac
from latest
order by segment, latent_set
