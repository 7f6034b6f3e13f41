-- How far fine-tuning moves the base SAE's latents: the study's fine-tuned SAE (checkpoint null)
-- and, per fine-tuning checkpoint, a base SAE briefly fine-tuned on it. Parameters: none.
with latest as (
    -- the newest run per hook and step (the view keeps the newest of every dictionary)
    select *
    from latent_drift
    qualify created_at = max(created_at) over (partition by hook, step)
)

select
    hook,
    coalesce(cast(step as varchar), 'study fine-tune') as fine_tuned_on,
    count(*) as n_latents,
    round(median(dec_cos), 4) as median_dec_cos,
    round(avg(case when dec_cos < 0.9 then 1 else 0 end), 4) as frac_dec_cos_below_0_9,
    round(median(enc_cos), 4) as median_enc_cos,
    round(median(dec_norm_ratio), 3) as median_dec_norm_ratio
from latest
group by hook, step
order by hook, step nulls last
