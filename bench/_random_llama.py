"""Random-weight Llama models for the benches, built directly on the target device and dtype.

A bench that times a random model needs no weights on disk: `random_llama` writes only the
config and the tokenizer to a folder (what the TransformerBridge and the cache's metadata read)
and returns the Hugging Face model, initialised on `device` in `dtype`; `boot` wraps it as the
bridge `sae_transfer.models.load_model` would have loaded from that folder. A 7B-shape model is
then built in seconds on a GPU instead of being initialised in fp32 on the CPU and written to
disk (about 34 GB for an 8.6B-parameter fp32 model).
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_llama(folder: Path, tokenizer, *, d_model: int, layers: int, vocab: int | None = None, mlp: int | None = None,
                 heads: int | None = None, kv_heads: int | None = None, max_positions: int = 2048,
                 device: str = "cpu", dtype: str = "float32", seed: int = 0, special_ids: bool = False):
    """Save `tokenizer` and a LlamaConfig (no weights) under `folder`; return the model, with
    weights drawn after `torch.manual_seed(seed)` on `device` in `dtype`. On the CPU in float32
    the weights equal those of `torch.manual_seed(seed); LlamaForCausalLM(cfg)`.

    vocab: None for the tokenizer's size (never fewer than it has); mlp: None for 4 * d_model; heads: None for d_model // 64;
    kv_heads: None for `heads`; special_ids: put the tokenizer's bos/eos/pad ids in the config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    heads = heads or max(1, d_model // 64)
    ids = (dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
           if special_ids else {})
    cfg = LlamaConfig(vocab_size=max(vocab or 0, len(tokenizer)), hidden_size=d_model, intermediate_size=mlp or 4 * d_model,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
    cfg.save_pretrained(folder)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # as from_config(torch_dtype=...) does; RoPE's inv_freq stays float32
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


def boot(folder: Path, hf_model, device: str, dtype: str = "float32", attn_implementation: str = "auto"):
    """The TransformerBridge over the in-memory `hf_model` (config and tokenizer from `folder`),
    set up as `load_model` sets up a bridge it loads: eval mode, family check, attention kernel."""
    from transformer_lens.model_bridge import TransformerBridge

    from sae_transfer.attention import apply_attention
    from sae_transfer.models import check_device, check_family

    device = check_device(device)
    bridge = TransformerBridge.boot_transformers(str(Path(folder).resolve()), device=device, dtype=DTYPES[dtype],
                                                 hf_model=hf_model)
    bridge.eval()
    check_family(bridge, str(folder))
    apply_attention(bridge, attn_implementation, device)
    return bridge


def word_level_tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` entries t0..t{vocab-1}: only its size matters for timing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2")


def peak_gib(device: str) -> float | None:
    """torch.cuda.max_memory_allocated on `device` in GiB; None off CUDA."""
    dev = torch.device(device)
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
