-- The activation difference chat - base overall, per role and per position bucket, and its top
-- principal directions with the SAE latents whose decoders align best. Parameters: ?1 base model
-- id, ?2 chat model id.
with latest as (
    select *
    from activation_diff
    where same_model(base_model, ?1) and same_model(chat_model, ?2)
    qualify created_at = max(created_at) over (partition by hook)
),

groups as (
    select hook, kind, key, rank, count, mean_diff_norm, norm_of_mean, mean_base_norm, null as variance_share,
           null as aligned_latents
    from latest
    where kind in ('all', 'role', 'position')
),

aligned as (
    -- per component, its best-aligned latents as "dictionary:latent (|cos|)"
    select hook, component,
           string_agg(dictionary || ':' || latent || ' (' || round(latent_cos, 2) || ')', ', ' order by latent_cos desc)
               as aligned_latents
    from latest
    where kind = 'component_latent'
    group by hook, component
),

components as (
    select c.hook, c.kind, c.key, c.rank, null as count, null as mean_diff_norm, null as norm_of_mean,
           null as mean_base_norm, c.variance_share, a.aligned_latents
    from latest as c
    left join aligned as a using (hook, component)
    where c.kind = 'component'
)

select
    hook, kind, key, count,
    round(mean_diff_norm, 4) as mean_diff_norm,
    round(norm_of_mean, 4) as norm_of_mean,
    round(mean_diff_norm / nullif(mean_base_norm, 0), 3) as rel_to_activation,
    round(variance_share, 3) as variance_share,
    aligned_latents
from (select * from groups union all select * from components)
order by hook, case kind when 'all' then 0 when 'role' then 1 when 'position' then 2 else 3 end, rank
