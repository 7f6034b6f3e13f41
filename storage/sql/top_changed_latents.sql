-- The newest crosscoder's "changed" latents (both decoders alive, pointing apart), most frequent
-- first, with how far the write moved (||d^chat - d^base||, training units) and the norm of the
-- chat-minus-base direction in model units. Parameters: ?1 number of latents.
with latest as (
    select *
    from crosscoder_latents
    qualify created_at = max(created_at) over (partition by hook)
)

select
    hook,
    latent,
    round(rho, 3) as rho,
    round(dec_cos, 3) as dec_cos,
    round(diff_norm, 3) as diff_norm,
    round(sqrt(list_sum(list_transform(chat_minus_base, lambda v: v * v))), 4) as chat_minus_base_norm,
    frequency
from latest
where fire_count > 0 and latent_class = 'changed'
order by frequency desc, latent
limit ?1
