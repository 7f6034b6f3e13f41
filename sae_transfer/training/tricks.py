"""Training tricks from the seed posts, each a small pure function or class.

- geometric-median initialisation of b_dec (Bloom, GPT-2-small residual SAEs post);
- dead-latent tracking over a window of tokens;
- ghost grads, corrected form: exp of the *pre-activation* (the post's erratum), Anthropic Jan 2024;
- Anthropic-style resampling of dead latents (Towards Monosemanticity; Conmy's 1L-SAE tricks).
"""

from __future__ import annotations

import torch

from sae_transfer.sae import SAE


@torch.no_grad()
def geometric_median(points_ND: torch.Tensor, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """The point [D] minimising Σ_n ‖p_n − y‖ (Weiszfeld's iteration, started at the mean)."""
    points_ND = points_ND.double()
    y_D = points_ND.mean(0)
    for _ in range(max_iter):
        weights_N = 1.0 / (points_ND - y_D).norm(dim=-1).clamp_min(1e-12)
        y_next_D = (weights_N[:, None] * points_ND).sum(0) / weights_N.sum()
        moved = (y_next_D - y_D).norm()
        y_D = y_next_D
        if moved <= tol * max(float(y_D.norm()), 1.0):
            break
    return y_D.float()


class DeadTracker:
    """Tokens since each latent last fired, and firing counts for feature density (on the
    batches whose firings were counted: the logging steps). Counters live on `device`.

    A latent is dead once it has gone `window_tokens` tokens without firing. `any_dead()`
    answers on the host from an upper bound on the longest silence, so it waits on the device
    only when asked with exact=True (the loop asks so at log steps only) and the bound allows a
    dead latent. Between those reads it answers True whenever the bound allows one: the latents
    may then all be alive and `dead_mask()` all False, and the dead-latent losses (AuxK, ghost
    grads) are exactly 0, computed on the device, so a run syncs for dead latents only on log
    steps."""

    def __init__(self, d_sae: int, window_tokens: int, device: torch.device | str = "cpu"):
        self.window_tokens = window_tokens
        self.since_fired_F = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.fire_count_F = torch.zeros(d_sae, dtype=torch.float64, device=device)  # firings in the density window
        self.counted_tokens = 0  # tokens in the density window
        self._silence_bound = 0  # host: >= since_fired_F.max()

    def update(self, fired_F: torch.Tensor, n_tokens: int) -> None:
        """Record one batch of n_tokens: fired_F[f] is True if latent f fired on any of them."""
        self.since_fired_F += n_tokens
        self.since_fired_F.masked_fill_(fired_F, 0)
        self._silence_bound += n_tokens

    def add_counts(self, fire_count_F: torch.Tensor, n_tokens: int) -> None:
        """Add a batch to the density estimate: fire_count_F[f] = tokens on which f fired.
        The estimate restarts once it covers window_tokens tokens."""
        if self.counted_tokens >= self.window_tokens:
            self.fire_count_F.zero_()
            self.counted_tokens = 0
        self.fire_count_F += fire_count_F.double()
        self.counted_tokens += n_tokens

    def dead_mask(self) -> torch.Tensor:
        """Bool [F]: latents that have not fired for window_tokens tokens."""
        return self.since_fired_F >= self.window_tokens

    def any_dead(self, exact: bool = False) -> bool:
        """Whether some latent may be dead: False only if none is. Never reads the device unless
        `exact`; then one host sync, only when the bound allows a dead latent, and the answer
        is exact (and tightens the bound to the longest silence)."""
        if self._silence_bound < self.window_tokens:
            return False
        if not exact:
            return True
        self._silence_bound = int(self.since_fired_F.max())
        return self._silence_bound >= self.window_tokens

    def log10_density(self) -> torch.Tensor:
        """log10 of each latent's firing frequency in the current window (−10 for never), on the CPU."""
        density_F = self.fire_count_F.cpu() / max(self.counted_tokens, 1)
        return density_F.clamp_min(1e-10).log10().float()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (on the CPU)."""
        return {
            "dead.since_fired": self.since_fired_F.cpu().clone(),
            "dead.fire_count": self.fire_count_F.cpu().clone(),
            "dead.counted_tokens": torch.tensor(self.counted_tokens, dtype=torch.int64),
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from `state_tensors` (written on any device)."""
        self.since_fired_F.copy_(tensors["dead.since_fired"])
        self.fire_count_F.copy_(tensors["dead.fire_count"])
        self.counted_tokens = int(tensors["dead.counted_tokens"])
        self._silence_bound = int(tensors["dead.since_fired"].max()) if tensors["dead.since_fired"].numel() else 0


def ghost_grad_loss(
    x_BD: torch.Tensor,
    x_hat_BD: torch.Tensor,
    pre_BF: torch.Tensor,
    W_dec_FD: torch.Tensor,
    dead_F: torch.Tensor,
    mse_loss: torch.Tensor,
) -> torch.Tensor:
    """Ghost-grad loss (Anthropic, Jan 2024 update), scalar: dead latents, activated with
    exp(pre-activation) — not exp(ReLU(pre)), the GPT-2-small post's erratum — try to model
    the residual x − x̂. Their output is rescaled to half the residual's norm, and the loss
    is rescaled to equal `mse_loss`, so it only supplies a gradient direction (0 when no
    latent is dead).

    Masks, not indices: no host sync (the live latents' exp is 0, from a pre-activation of −inf)."""
    any_dead = dead_F.any()
    residual_BD = (x_BD - x_hat_BD).detach()
    wide = torch.promote_types(pre_BF.dtype, W_dec_FD.dtype)  # bf16 pre-activations are widened
    act_BF = torch.exp(pre_BF.masked_fill(~dead_F, float("-inf")).to(wide))
    ghost_out_BD = act_BF @ W_dec_FD.to(wide)
    ghost_norm_B1 = torch.where(any_dead, ghost_out_BD.norm(dim=-1, keepdim=True), 1.0)  # no dead latent: a finite scale
    scale_B1 = residual_BD.norm(dim=-1, keepdim=True) / (2 * ghost_norm_B1.clamp_min(1e-30))
    ghost_out_BD = ghost_out_BD * scale_B1.detach()
    ghost_mse = (ghost_out_BD - residual_BD).pow(2).sum(-1).mean()
    return torch.where(any_dead, ghost_mse * (mse_loss.detach() / ghost_mse.detach().clamp_min(1e-12)), 0.0)


@torch.no_grad()
def resample_dead_latents(
    sae: SAE,
    dead_F: torch.Tensor,
    x_ND: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    encoder_scale: float = 0.2,
) -> int:
    """Anthropic resampling: each dead latent gets an input x_n drawn with probability ∝ the
    square of the SAE's squared error on it; its decoder row becomes x_n's direction (at the
    mean alive decoder-row norm), its encoder column that direction at 0.2 × the mean alive
    encoder-column norm, b_enc = 0, and its Adam moments are zeroed. Returns how many."""
    dead_idx = dead_F.nonzero().squeeze(-1)
    if dead_idx.numel() == 0:
        return 0
    loss_N = (x_ND - sae(x_ND)).pow(2).sum(-1)
    # draw on the generator's device (the CPU's, so a seed gives the same picks on any device)
    weights_N = loss_N.pow(2).to(generator.device) + 1e-12
    picked = torch.multinomial(weights_N, dead_idx.numel(), replacement=True, generator=generator).to(x_ND.device)
    dirs_GD = torch.nn.functional.normalize(x_ND[picked], dim=-1)
    alive_F = ~dead_F
    one = torch.ones((), device=x_ND.device)
    enc_norm = sae.W_enc[:, alive_F].norm(dim=0).mean() if alive_F.any() else one
    dec_norm = sae.W_dec[alive_F].norm(dim=-1).mean() if alive_F.any() else one
    sae.W_dec[dead_idx] = dirs_GD * dec_norm
    sae.W_enc[:, dead_idx] = (dirs_GD * enc_norm * encoder_scale).T
    sae.b_enc[dead_idx] = 0.0
    _reset_adam_moments(optimizer, sae, dead_idx)
    return int(dead_idx.numel())


def _reset_adam_moments(optimizer: torch.optim.Optimizer, sae: SAE, idx_G: torch.Tensor) -> None:
    """Zero Adam's moment estimates for the rows/columns of resampled latents."""
    where = {id(sae.W_enc): (1, idx_G), id(sae.W_dec): (0, idx_G), id(sae.b_enc): (0, idx_G)}
    for param, state in optimizer.state.items():
        if id(param) not in where:
            continue
        dim, idx = where[id(param)]
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(dim, idx, 0.0)
