-- SAE training curves (every logged step of every run in the study).
select sae_id, step, tokens, lr, loss, mse, l0, explained_variance, dead_fraction
from training_log
order by sae_id, step
