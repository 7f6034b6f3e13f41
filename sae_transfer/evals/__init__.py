"""Transfer evaluation: how well an SAE reconstructs a model's activations and how much
next-token loss splicing it in costs, with outlier tokens excluded and included.

Plain torch: nothing here imports Prefect or DuckDB. Results come back as records (dicts)
whose keys are the columns of `storage.tables`.

Shape suffixes: N sequences (or tokens, when flattened), B batch of sequences, S positions,
D d_model (hook width), F SAE features, V vocabulary, R bootstrap resamples.

Units: SAEs saved by the trainer work on raw activations (the training-time norm scaling is
folded into their weights), so x_hat is computed from raw x; reported `mse` is then in scaled
units, i.e. both x and x_hat multiplied by s = sqrt(d_model) / E||x|| of the evaluated model
(DESIGN.md, "Metric definitions"). Explained variance and CE metrics do not depend on s.
"""
