"""Feature-level base-vs-chat diffing: which latents changed, appeared or vanished.

Plain torch (no Prefect, no DuckDB). Modules are imported where used, not here, so a caller
pays only for what it needs:

- `planted`: a tiny base/chat pair whose difference is known (a planted direction), and controls;
- `paired`: base and chat activation caches paired row by row, streamed as [B, 2D] batches;
- `crosscoder`: the BatchTopK crosscoder (Minder et al. 2025) and its latent taxonomy;
- `crosscoder_run`: resumable crosscoder training into a run folder;
- `latent_scaling`: Latent Scaling β and the ν ratios (Minder et al. 2025);
- `activation_diff`: chat − base on the same tokens per token, role, position, and its principal directions;
- `diff_sae`: an SAE trained on chat − base (a change confined to some tokens becomes one latent);
- `planted_kinds`: more planted pairs (a token's row, a dense shift, a rotation, a rescaling);
- per-latent statistics, SAE matching, max-activating examples and causal checks live in their
  own modules next to these.

Shape legend: B batch (tokens), D d_model of one model, M models (2: base, chat), F latents
(d_sae), L a subset of latents, K active latents per token, N tokens of a stream.
"""
