-- Latent Scaling of the crosscoder's chat-only latents (Minder et al. 2025): nu_error large =
-- Complete Shrinkage, nu_recon large = Latent Decoupling, both small = truly chat-specific.
-- Parameters: none.
with latest as (
    select *
    from latent_scaling
    where kind = 'crosscoder'
    qualify row_number() over (partition by dictionary, latent order by created_at desc) = 1
)

select hook, latent, round(nu_error, 3) as nu_error, round(nu_recon, 3) as nu_recon, verdict, fire_count
from latest
order by nu_error nulls last
