-- The live crosscoder latents that changed most: chat-only ones first, then "changed" ones (both
-- decoders alive, pointing apart; most frequent first), then the most chat-leaning by rho, with
-- their max-activating contexts on the paired tokens. Parameters: ?1 base model id, ?2 chat model id (the pair the
-- crosscoder was trained on), ?3 number of latents.
with cc as (
    select *
    from crosscoder_latents
    -- dictionary_model is '<base> + <chat>' as the caches name them (a folder name or a full path)
    where same_model(split_part(dictionary_model, ' + ', 1), ?1)
        and same_model(split_part(dictionary_model, ' + ', 2), ?2)
    qualify created_at = max(created_at) over (partition by hook)
),

top as (
    select dictionary, latent, latent_class, rho, dec_cos, frequency, norm_base, norm_chat
    from cc
    where fire_count > 0
    order by latent_class = 'chat_only' desc, latent_class = 'changed' desc,
             case when latent_class = 'changed' then frequency end desc nulls last, rho desc
    limit ?3
),

examples as (
    -- the view holds the newest examples run of each dictionary
    select *
    from latent_examples
    where model = 'paired'
)

select
    t.latent, t.latent_class, t.rho, t.dec_cos, t.frequency, t.norm_base, t.norm_chat,
    e.rank, e.activation, e.pos, e.window_start, e.tokens, e.acts
from top as t
join examples as e using (dictionary, latent)
where e.rank < 4
order by t.latent_class = 'chat_only' desc, t.latent_class = 'changed' desc, t.rho desc, t.latent, e.rank
