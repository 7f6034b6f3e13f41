"""Which attention kernel a loaded model runs: eager or PyTorch SDPA.

TransformerLens 4's bridge loads every model with eager attention, and for the rotary families
(llama, mistral, qwen2, gemma, ...) its attention component re-implements attention step by step
so that `hook_attn_scores` / `hook_pattern` fire. That is bit-exact with Hugging Face's eager
attention, and what a check against `output_hidden_states` wants, but on a GPU at long contexts
SDPA (flash / memory-efficient kernels) makes the forward pass ~1.5x faster.

`use_attention(bridge, "sdpa")` switches the HF model to SDPA and makes each such attention
component delegate to the HF attention module (TransformerLens's own pass-through forward,
`AttentionBridge.forward`): the q/k/v/o projections, `hook_in`/`hook_out`, the residual hooks
and every block-level hook still fire; the hooks inside the attention kernel (scores, pattern,
rotary q/k, cos/sin) do not. "auto" picks SDPA on CUDA and eager elsewhere, and eager whenever a
requested hook lives inside the kernel or the model needs eager (attention logit soft-capping).
"""

from __future__ import annotations

import logging
import types

import torch

from sae_transfer.errors import UserError

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa")
# hooks that only fire inside TransformerLens's eager attention
_KERNEL_HOOKS = ("hook_attn_scores", "hook_pattern", "hook_rot_q", "hook_rot_k", "hook_cos", "hook_sin")


def kernel_hooks(hooks) -> list[str]:
    """The hooks among `hooks` that only the eager attention serves."""
    return [h for h in hooks if h.rsplit(".", 1)[-1] in _KERNEL_HOOKS]


def check_choice(choice: str, hooks=()) -> str:
    """`choice` validated against ATTN_IMPLEMENTATIONS and the hooks to capture: "auto" becomes
    "eager" when a hook lives inside the attention kernel; "sdpa" with such a hook is an error."""
    if choice not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"attn_implementation {choice!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}: "
                        "pick auto, eager or sdpa")
    inside = kernel_hooks(hooks)
    if inside and choice == "sdpa":
        raise UserError(f"hooks {inside} only fire with eager attention: pass attn_implementation eager (or auto)")
    return "eager" if inside else choice


def apply_attention(bridge, choice: str, device: str | torch.device) -> str:
    """Set up `bridge` for `choice` (auto: SDPA on CUDA where the model allows it, else eager);
    returns the implementation in effect, "eager" or "sdpa"."""
    check_choice(choice)
    if choice != "auto":
        return use_attention(bridge, choice)
    if torch.device(device).type != "cuda":
        return use_attention(bridge, "eager")
    try:
        return use_attention(bridge, "sdpa")
    except UserError as exc:  # a family SDPA cannot serve: auto means "the fastest that is exact"
        log.info("eager attention: %s", exc)
        return use_attention(bridge, "eager")


def _sdpa_blocker(bridge) -> str | None:
    """Why this model cannot run SDPA through the bridge (None when it can)."""
    from transformer_lens.model_bridge.generalized_components.attention import (
        AttentionBridge,  # deferred: transformer_lens takes seconds to import
    )
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    hf_cfg = bridge.original_model.config
    if getattr(hf_cfg, "attn_logit_softcapping", None):
        return f"{hf_cfg.model_type} soft-caps attention logits, which SDPA kernels do not"
    for module in bridge.modules():
        if isinstance(module, AttentionBridge) and not isinstance(module, PositionEmbeddingsAttentionBridge) \
                and type(module).forward is not AttentionBridge.forward:
            return f"{hf_cfg.model_type}'s bridge computes attention itself ({type(module).__name__})"
    return None


def use_attention(bridge, impl: str) -> str:
    """Make `bridge` run `impl` ("eager" or "sdpa"); returns the implementation in effect.

    Raises UserError when SDPA was asked for and this model cannot use it.
    """
    from transformer_lens.model_bridge.generalized_components.attention import (
        AttentionBridge,  # deferred: transformer_lens takes seconds to import
    )
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    hf = bridge.original_model
    if impl == "sdpa":
        why = _sdpa_blocker(bridge)
        if why is not None:
            raise UserError(f"cannot run SDPA attention: {why}; pass attn_implementation eager (or auto)")
        try:
            hf.set_attn_implementation("sdpa")
        except (ValueError, ImportError) as exc:
            raise UserError(f"cannot run SDPA attention: {str(exc).splitlines()[0]}; pass attn_implementation eager") from exc
    elif impl == "eager":
        hf.set_attn_implementation("eager")
    else:
        raise UserError(f"attention implementation {impl!r}: use eager or sdpa")
    for module in bridge.modules():
        if isinstance(module, PositionEmbeddingsAttentionBridge):
            # object.__setattr__: the bridge's own __setattr__ forwards unknown names to the HF module
            if impl == "sdpa":
                object.__setattr__(module, "forward", types.MethodType(AttentionBridge.forward, module))
            else:
                module.__dict__.pop("forward", None)
    return impl


def attention_of(bridge) -> str:
    """The attention implementation `bridge` runs now ("eager" or "sdpa")."""
    return str(getattr(bridge.original_model.config, "_attn_implementation", None) or "eager")
