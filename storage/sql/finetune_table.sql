-- Fine-tuned base SAE vs chat SAE vs base SAE on the chat model, outliers included
-- (the study's fine-tuning table), with the tokens each SAE was trained on.
-- Parameters: ?1 base model id, ?2 chat model id.
with on_chat as (
    -- the view keeps one row per model id and revision; the table shows the newest on the chat model
    select *
    from metrics
    where segment = 'text' and outlier_policy = 'included' and same_model(model_id, ?2)
    qualify row_number() over (partition by sae_id, hook order by created_at desc) = 1
),

trained as (
    select sae_id, max(tokens) as train_tokens
    from training_log
    group by sae_id
)

select
    m.hook,
    sae_label(m.sae_model, m.sae_finetuned_from, ?1, ?2) as sae,
    t.train_tokens,
    round(m.l0, 1) as l0,
    round(100 * m.ce_loss_score, 2) as ce_loss_rec_pct,
    round(m.ce_sae, 3) as sae_ce,
    round(m.ce_delta, 3) as ce_delta,
    round(100 * m.explained_variance_legacy, 1) as ev_legacy_pct,
    round(m.mse, 2) as mse
from on_chat as m
left join trained as t on t.sae_id = split_part(m.sae_id, ':', 1)
order by m.hook, sae
