-- The study's outlier table: threshold, fraction of outliers, and what they are
-- (the view holds each model's newest outlier tagging per revision and hook).
select
    model_id as model,
    hook,
    outlier_rule as rule,
    round(outlier_threshold, 2) as threshold,
    n_tokens,
    n_outliers,
    round(frac_outliers, 6) as frac_outliers,
    round(100 * frac_bos, 1) as bos_pct,
    round(100 * frac_first10, 1) as first10_pct,
    round(100 * frac_newline, 1) as newline_pct,
    round(100 * frac_other, 1) as other_pct
from outlier_summary
order by hook, model, rule
