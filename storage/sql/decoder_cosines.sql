-- Decoder cosines: crosscoder base-vs-chat decoder of each live latent (by class), and the
-- one-to-one matches between the study's SAEs. Parameters: none.
with cc as (
    select *
    from crosscoder_latents
    qualify created_at = max(created_at) over (partition by hook)
),

matches as (
    -- the newest matching per kind of pair
    select *, dictionary_b like 'finetuned%' as to_child
    from latent_matches
    qualify created_at = max(created_at) over (partition by hook, dictionary_b like 'finetuned%')
)

select 'crosscoder ' || latent_class as source, dec_cos, rho
from cc
where fire_count > 0
union all
select
    case when to_child then 'base SAE vs fine-tuned' else 'base SAE vs chat SAE' end as source,
    dec_cos,
    null as rho
from matches
where latent_b is not null
