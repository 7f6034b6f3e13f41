"""Forward passes for CE/KL evaluation: clean (caching the hook), hook zeroed, SAE spliced in
at masked positions only (positions outside the mask keep their own activation).

For `blocks.L.hook_resid_pre` (L >= 1) the patched passes resume from the residual stream at
block L (`start_at_layer`) instead of recomputing blocks 0..L-1, whose output the clean pass
already gave: identical logits, and a mid-layer evaluation costs about two forward passes
instead of three. Other hooks run the whole model with a hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import re
from typing import Callable

import torch

_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")


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


def _decoder_parts(model):
    """(layers, rotary, final norm, unembed) of a Llama-family HF model (Llama, Qwen2, Mistral,
    ...), or None for architectures whose blocks we cannot call directly."""
    hf = getattr(model, "original_model", None)
    inner = getattr(hf, "model", None)
    parts = tuple(getattr(inner, name, None) for name in ("layers", "rotary_emb", "norm")) + (getattr(hf, "lm_head", None),)
    return parts if all(p is not None for p in parts) else None


def resume_from_layer(model, x_BSD: torch.Tensor, layer: int) -> torch.Tensor | None:
    """Logits [B, S, V] of running blocks `layer`.. on residual x_BSD (causal, unpadded on the left).

    TransformerBridge's own `start_at_layer` still runs every block, so the remaining decoder
    layers are called directly; returns None for architectures without that structure.
    """
    parts = _decoder_parts(model)
    if parts is None:
        return None
    layers, rotary, norm, unembed = parts
    B, S, _ = x_BSD.shape
    position_ids = torch.arange(S, device=x_BSD.device)[None].expand(B, S)
    position_embeddings = rotary(x_BSD, position_ids)
    causal = torch.full((S, S), float("-inf"), dtype=x_BSD.dtype, device=x_BSD.device).triu(1)
    mask = causal[None, None].expand(B, 1, S, S)
    h_BSD = x_BSD
    for block in layers[layer:]:
        h_BSD = block(h_BSD, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
        h_BSD = h_BSD[0] if isinstance(h_BSD, tuple) else h_BSD
    return unembed(norm(h_BSD))


def patched_logits(
    model, tokens_BS: torch.Tensor, hook: str, patch: Callable[[torch.Tensor], torch.Tensor],
    clean_x_BSD: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B, S, V] with the hook's activation replaced by `patch(act_BSD)`.

    With `clean_x_BSD` (the clean activation at `hook`) and a resid_pre hook of a Llama-family
    model, only the blocks from the hook on are run, starting from `patch(clean_x_BSD)`.
    """
    layer = resume_layer(hook)
    if layer is not None and clean_x_BSD is not None:
        logits = resume_from_layer(model, patch(clean_x_BSD), layer)
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

    def kl_from(self, clean: "LogitStats") -> torch.Tensor:
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
