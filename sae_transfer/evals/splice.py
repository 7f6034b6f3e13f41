"""Forward passes for CE/KL evaluation: clean (caching the hook), hook zeroed, SAE spliced in
at masked positions only (positions outside the mask keep their own activation).

For `blocks.L.hook_resid_pre` (L >= 1) of a family in RESUMABLE_FAMILIES the patched passes
resume from the residual stream at block L instead of recomputing blocks 0..L-1, whose output
the clean pass already gave: identical logits (the model's own forward and post-processing run),
and a mid-layer evaluation costs about two forward passes instead of three. Other hooks and
families run the whole model with a hook.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
# Families whose resumed pass tests/test_families.py proves equal to the full hooked pass
# (HF `config.model_type`). Others run the whole model with a hook: same logits, one more block
# stack per patched pass.
RESUMABLE_FAMILIES = frozenset({"llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2"})


def resume_layer(hook: str) -> int | None:
    """Block a patched pass can start at for this hook, or None (run the whole model)."""
    m = _RESID_PRE.match(hook)
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once the hooked activation is captured."""


def hook_activations(model, tokens_BS: torch.Tensor, hook: str) -> torch.Tensor:
    """The hook's activations [B, S, D] in the model's dtype; the pass stops at the hook."""
    captured: dict[str, torch.Tensor] = {}

    def grab(act, hook=None):
        captured["x"] = act.detach()
        raise _StopForward

    try:
        model.run_with_hooks(tokens_BS, return_type=None, fwd_hooks=[(hook, grab)])
    except _StopForward:
        pass
    return captured["x"]


def clean_pass(model, tokens_BS: torch.Tensor, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One unhooked forward: (activations at `hook` [B, S, D], logits [B, S, V])."""
    captured: dict[str, torch.Tensor] = {}

    def grab(act, hook=None):
        captured["x"] = act.detach()
        return act

    logits_BSV = model.run_with_hooks(tokens_BS, return_type="logits", fwd_hooks=[(hook, grab)])
    return captured["x"], logits_BSV


def _block_list(model) -> nn.ModuleList | None:
    """The HF ModuleList holding the bridge's blocks in order, if the family is resumable."""
    hf = getattr(model, "original_model", None)
    blocks = getattr(model, "blocks", None)
    if hf is None or not blocks or getattr(hf.config, "model_type", None) not in RESUMABLE_FAMILIES:
        return None
    for module in hf.modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(blocks) and all(a is b for a, b in zip(module, blocks)):
            return module
    return None


class _Resume(nn.Module):
    """Stands in for a skipped block: returns the residual the resumed pass starts from."""

    def __init__(self, x_BSD: torch.Tensor):
        super().__init__()
        self.x_BSD = x_BSD

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.x_BSD


def resume_from_layer(model, x_BSD: torch.Tensor, layer: int, tokens_BS: torch.Tensor | None = None) -> torch.Tensor | None:
    """Logits [B, S, V] of the model with the residual entering block `layer` set to x_BSD.

    The model's own forward runs (masks per layer type, sliding windows, positions, final norm,
    soft-capping and any other post-processing of the family), with blocks 0..layer-1 replaced
    for this call by stand-ins that return x_BSD; only the embedding lookup is spent on them.
    TransformerBridge's `start_at_layer` still runs every block, hence this. Returns None for a
    family not in RESUMABLE_FAMILIES (the caller runs the full hooked pass). The swap mutates
    the model for the duration of the call: do not share one model object between threads.
    """
    layers = _block_list(model)
    if layers is None or not 1 <= layer < len(layers):
        return None
    if tokens_BS is None:  # the stand-ins ignore the embedding, any ids of the right shape do
        tokens_BS = torch.zeros(x_BSD.shape[:2], dtype=torch.long, device=x_BSD.device)
    skipped = [layers[i] for i in range(layer)]
    stand_in = _Resume(x_BSD)
    try:
        for i in range(layer):
            layers[i] = stand_in
        return model(tokens_BS, return_type="logits")
    finally:
        for i, block in enumerate(skipped):
            layers[i] = block


def patched_logits(
    model, tokens_BS: torch.Tensor, hook: str, patch: Callable[[torch.Tensor], torch.Tensor],
    clean_x_BSD: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B, S, V] with the hook's activation replaced by `patch(act_BSD)`.

    With `clean_x_BSD` (the clean activation at `hook`) and a resid_pre hook of a resumable
    family, only the blocks from the hook on are run, starting from `patch(clean_x_BSD)`.
    """
    layer = resume_layer(hook)
    if layer is not None and clean_x_BSD is not None:
        logits = resume_from_layer(model, patch(clean_x_BSD), layer, tokens_BS)
        if logits is not None:
            return logits
    return model.run_with_hooks(tokens_BS, return_type="logits", fwd_hooks=[(hook, lambda act, hook=None: patch(act))])


def zero_logits(model, tokens_BS: torch.Tensor, hook: str, clean_x_BSD: torch.Tensor | None = None) -> torch.Tensor:
    """Logits with the hook's output set to zero at every position (zero-ablation baseline)."""
    return patched_logits(model, tokens_BS, hook, torch.zeros_like, clean_x_BSD)


def spliced_logits(
    model, tokens_BS: torch.Tensor, hook: str, x_hat_BSD: torch.Tensor, mask_BS: torch.Tensor,
    clean_x_BSD: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits with x_hat spliced in where mask_BS is true; other positions keep their activation."""
    def splice(act_BSD: torch.Tensor) -> torch.Tensor:
        return torch.where(mask_BS[..., None], x_hat_BSD.to(act_BSD.dtype), act_BSD)

    return patched_logits(model, tokens_BS, hook, splice, clean_x_BSD)


def next_token_logprobs(logits_BSV: torch.Tensor) -> torch.Tensor:
    """log-softmax in float32 [B, S, V]."""
    return torch.log_softmax(logits_BSV.float(), dim=-1)


def next_token_loss(logp_BSV: torch.Tensor, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Per-position loss [B, S] (nats) of predicting token s+1 at position s; the last position is 0."""
    loss_BS = torch.zeros(tokens_BS.shape, dtype=torch.float32, device=logp_BSV.device)
    targets = tokens_BS[:, 1:].unsqueeze(-1)
    loss_BS[:, :-1] = -logp_BSV[:, :-1].gather(-1, targets).squeeze(-1)
    return loss_BS


@dataclass
class LogitStats:
    """What the CE and KL metrics need from one pass's logits, per position [B, S]."""

    loss_BS: torch.Tensor  # next-token loss, nats (0 at the last position)
    lse_BS: torch.Tensor  # logsumexp of the logits
    dot_BS: torch.Tensor  # sum_v p_clean(v) * logit(v)

    def kl_from(self, clean: LogitStats) -> torch.Tensor:
        """KL(clean || this pass) per position, nats.

        KL = sum p_c (log p_c - log p) = (dot_c - dot) + (lse - lse_c), since sum p_c = 1; a pass
        with the clean logits gives exactly 0, and no [B, S, V] log-probabilities are built.
        """
        return (clean.dot_BS - self.dot_BS) + (self.lse_BS - clean.lse_BS)


def logit_stats(logits_BSV: torch.Tensor, tokens_BS: torch.Tensor, p_clean_BSV: torch.Tensor) -> LogitStats:
    """Loss, logsumexp and the p_clean-weighted logit sum of one pass (float32)."""
    logits_BSV = logits_BSV.float()
    lse_BS = torch.logsumexp(logits_BSV, dim=-1)
    loss_BS = torch.zeros(tokens_BS.shape, dtype=torch.float32, device=logits_BSV.device)
    target_BS = logits_BSV[:, :-1].gather(-1, tokens_BS[:, 1:].unsqueeze(-1)).squeeze(-1)
    loss_BS[:, :-1] = lse_BS[:, :-1] - target_BS
    return LogitStats(loss_BS, lse_BS, torch.einsum("bsv,bsv->bs", p_clean_BSV, logits_BSV))


def kl_per_token(logp_clean_BSV: torch.Tensor, logp_patched_BSV: torch.Tensor) -> torch.Tensor:
    """KL(clean || patched) per position [B, S], nats."""
    return (logp_clean_BSV.exp() * (logp_clean_BSV - logp_patched_BSV)).sum(-1)


def loss_mask(counted_BS: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token loss counts: counted, and the next position is a real token."""
    mask_BS = torch.zeros_like(counted_BS)
    mask_BS[:, :-1] = counted_BS[:, :-1] & valid_BS[:, 1:]
    return mask_BS
