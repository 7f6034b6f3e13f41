"""A random-weight pair with Qwen1.5-0.5B's exact shapes (fewer layers), and a tokenizer of its size.

`qwen_shape_pair(root)` saves `root/base` and `root/chat`: Qwen2 models with Qwen1.5-0.5B's
configuration (hidden 1024, MLP 2816, 16 heads, 16 key-value heads, vocabulary 151,936, untied
embeddings, rope theta 1e6, 32,768 positions) but `n_layers` blocks, the chat model being the base
plus a small perturbation. Both folders hold a byte-level BPE tokenizer with exactly 151,936
entries: a few hundred merges learnt on stdlib text, synthetic filler entries, and Qwen's special
tokens at Qwen's ids (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645). As in Qwen1.5,
the tokenizer has no BOS token; the chat tokenizer carries Qwen1.5-Chat's ChatML template.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests._tiny import _training_text

VOCAB = 151_936
D_MODEL = 1024
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_IDS = {ENDOFTEXT: 151_643, IM_START: 151_644, IM_END: 151_645}

# Qwen1.5-Chat's template (tokenizer_config.json of Qwen/Qwen1.5-0.5B-Chat).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_qwen_shape_tokenizer(chat: bool):
    """A `PreTrainedTokenizerFast` with `VOCAB` entries (ids 0..VOCAB-1 all used), Qwen's specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    learner.train_from_iterator(_training_text(), trainer=trainer)
    model = json.loads(learner.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # synthetic filler entries up to Qwen's first special id (never produced: no merge reaches them)
    filler = (f"<|synthetic_{i}|>" for i in range(VOCAB))
    while len(vocab) < SPECIAL_IDS[ENDOFTEXT]:
        vocab[next(filler)] = len(vocab)
    for tok, idx in SPECIAL_IDS.items():
        vocab[tok] = idx
    # Qwen's config pads the embedding past its tokenizer; here the padding rows are vocabulary too
    while len(vocab) < VOCAB:
        vocab[next(filler)] = len(vocab)
    assert sorted(vocab.values()) == list(range(VOCAB))

    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_IDS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        # As in Qwen1.5: no BOS token; the base ends documents with <|endoftext|>, the chat model ends
        # turns with <|im_end|> (its eos). TransformerLens would make each eos the BOS;
        # `models.align_bos` gives both the configs' bos_token_id (<|endoftext|>) instead.
        eos_token=IM_END if chat else ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )
    if chat:
        tok.chat_template = CHATML_TEMPLATE
    assert len(tok) == VOCAB and tok.convert_tokens_to_ids(IM_END) == SPECIAL_IDS[IM_END]
    return tok


def qwen_shape_config(n_layers: int = 2, chat: bool = False):
    """Qwen1.5-0.5B's (or -Chat's) config.json values with `n_layers` blocks."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=2816, num_hidden_layers=n_layers,
        num_attention_heads=16, num_key_value_heads=16, hidden_act="silu", max_position_embeddings=32_768,
        max_window_layers=21, rms_norm_eps=1e-6, rope_theta=1_000_000.0, sliding_window=32_768,
        use_sliding_window=False, tie_word_embeddings=False, initializer_range=0.02, attention_dropout=0.0,
        bos_token_id=SPECIAL_IDS[ENDOFTEXT], eos_token_id=SPECIAL_IDS[IM_END if chat else ENDOFTEXT], torch_dtype="float32",
    )


def qwen_shape_pair(root: Path, n_layers: int = 2, seed: int = 0, perturb: float = 0.02) -> tuple[Path, Path]:
    """Save (base, chat) folders under `root` (reused when present); chat = base + perturb x N(0, std of each tensor)."""
    import torch
    from transformers import Qwen2ForCausalLM

    base, chat = Path(root) / "base", Path(root) / "chat"
    if (base / "config.json").is_file() and (chat / "config.json").is_file():
        return base, chat
    torch.manual_seed(seed)
    cfg = qwen_shape_config(n_layers)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(base)
    build_qwen_shape_tokenizer(chat=False).save_pretrained(base)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (perturb * float(p.std()) if p.numel() > 1 else perturb))
    model.config.eos_token_id = SPECIAL_IDS[IM_END]  # Qwen1.5-0.5B-Chat's config.json
    model.save_pretrained(chat)
    build_qwen_shape_tokenizer(chat=True).save_pretrained(chat)
    return base, chat
