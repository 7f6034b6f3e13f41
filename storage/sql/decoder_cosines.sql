-- Decoder cosines: crosscoder base-vs-chat decoder of each live latent (by class), and the
-- one-to-one matches between the study's SAEs. Parameters: none.
with cc as (
    select *
    from crosscoder_latents
    where fire_count > 0
    qualify row_number() over (partition by dictionary, latent order by created_at desc) = 1
),

matches as (
    select *
    from latent_matches
    qualify row_number() over (partition by dictionary_a, dictionary_b, latent_a order by created_at desc) = 1
)

select 'crosscoder ' || latent_class as source, dec_cos, rho
from cc
union all
select
    case when dictionary_b like 'finetuned%' then 'base SAE vs fine-tuned' else 'base SAE vs chat SAE' end as source,
    dec_cos,
    null as rho
from matches
where latent_b is not null
