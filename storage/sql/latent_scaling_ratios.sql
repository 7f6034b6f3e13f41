-- Latent Scaling of the crosscoder's chat-only latents (Minder et al. 2025): nu_error large =
-- Complete Shrinkage, nu_recon large = Latent Decoupling, both small = truly chat-specific.
-- Parameters: none.
with latest as (
    -- the newest run at each hook (the view keeps the newest of every dictionary)
    select *
    from latent_scaling
    where kind = 'crosscoder'
    qualify created_at = max(created_at) over (partition by hook)
)

select hook, latent, round(nu_error, 3) as nu_error, round(nu_recon, 3) as nu_recon, verdict, fire_count
from latest
order by nu_error nulls last
