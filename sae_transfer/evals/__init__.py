"""Transfer evaluation: how well an SAE reconstructs a model's activations and how much
next-token loss splicing it in costs, with outlier tokens excluded and included.

Plain torch: nothing here imports Prefect or DuckDB. Results come back as records (dicts)
whose keys are the columns of `sae_transfer.storage.tables`.

Shape suffixes: N sequences (or tokens, when flattened), B batch of sequences, S positions,
D d_model (hook width), F SAE features, V vocabulary, R bootstrap resamples.

Units: SAEs saved by the trainer read raw activations of their own model (the training scale
s_train is folded into their weights). On a model with scale s_eval = sqrt(d_model) / E||x||
they reconstruct x_hat = SAE(r x) / r with r = s_eval / s_train (`sae.scaling`, DESIGN.md
"Scaling"); reported `mse` is in scaled units (x and x_hat times s_eval). Explained variance and
CE metrics do not depend on s.
"""
