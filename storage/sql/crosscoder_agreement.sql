-- Can the newest crosscoder's classes be trusted? Among live latents whose relative decoder norm
-- rho lies in the shared band, how many point their two decoders apart (cosine below the recorded
-- agree_min_cos): most of them apart means an under-trained (or independently initialised)
-- crosscoder rather than a changed model. And how much of the activation difference chat - base
-- its own reconstructions reproduce (diff_explained): near 0, it has not learnt where the models
-- differ, and "all shared" means nothing. Parameters: none.
with latest as (
    select *
    from crosscoder_latents
    qualify created_at = max(created_at) over (partition by hook)
),

balanced as (
    select *
    from latest
    where fire_count > 0 and rho between shared_min and shared_max
)

select
    hook,
    count(*) as n_balanced,
    count(*) filter (where dec_cos < coalesce(agree_min_cos, 0.8)) as n_disagree,
    round(median(dec_cos), 3) as median_dec_cos,
    round(min(dec_cos), 3) as min_dec_cos,
    any_value(coalesce(agree_min_cos, 0.8)) as agree_min_cos,
    round(any_value(diff_explained), 3) as diff_explained,
    median(dec_cos) < any_value(coalesce(agree_min_cos, 0.8)) as disagree,
    coalesce(any_value(diff_explained) < 0.5, false) as misses_difference
from balanced
group by hook
order by hook
