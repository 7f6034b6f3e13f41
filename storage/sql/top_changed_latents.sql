-- The newest crosscoder's "changed" latents (both decoders alive, pointing apart), most frequent
-- first, with how far the write moved (||d^chat - d^base||, training units), the norm of the
-- chat-minus-base direction in model units, and the activation difference's top token whose mean
-- chat - base points most along that direction (the dictionary's finding grounded in the raw
-- difference). Parameters: ?1 base model id, ?2 chat model id (the pair the crosscoder was
-- trained on), ?3 number of latents.
with latest as (
    select *
    from crosscoder_latents
    -- dictionary_model is '<base> + <chat>' as the caches name them (a folder name or a full path)
    where same_model(split_part(dictionary_model, ' + ', 1), ?1)
        and same_model(split_part(dictionary_model, ' + ', 2), ?2)
    qualify created_at = max(created_at) over (partition by hook)
),

changed as (
    select *
    from latest
    where fire_count > 0 and latent_class = 'changed'
    order by frequency desc, latent
    limit ?3
),

tokens as (
    -- the newest activation-difference pass per hook: its top tokens' mean differences
    select hook, coalesce(token, cast(token_id as varchar)) as token, direction
    from activation_diff
    where kind = 'token' and same_model(base_model, ?1) and same_model(chat_model, ?2)
    qualify created_at = max(created_at) over (partition by hook)
),

best_token as (
    select
        c.hook, c.latent, t.token,
        list_cosine_similarity(c.chat_minus_base, t.direction) as token_cos
    from changed as c
    join tokens as t using (hook)
    where len(c.chat_minus_base) = len(t.direction)
    qualify row_number() over (partition by c.hook, c.latent order by token_cos desc) = 1
)

select
    c.hook,
    c.latent,
    round(c.rho, 3) as rho,
    round(c.dec_cos, 3) as dec_cos,
    round(c.diff_norm, 3) as diff_norm,
    round(sqrt(list_sum(list_transform(c.chat_minus_base, lambda v: v * v))), 4) as chat_minus_base_norm,
    c.frequency,
    b.token as best_diff_token,
    round(b.token_cos, 3) as best_diff_token_cos
from changed as c
left join best_token as b using (hook, latent)
order by c.frequency desc, c.latent
