"""Byte-level BPE tokenizer for the demo pair, its chat template, and chat encoding with roles."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sae_transfer.chat_pairs import ASSISTANT, BOS, END, EOS, PAD, SPECIAL_TOKENS, USER
from sae_transfer.corpus import ROLE_CODE

# Jinja chat template stored in tokenizer_config.json. Role tokens and <|end|> frame each turn;
# the same string rendering is reproduced token by token in `encode_chat`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on `texts`; returns a `PreTrainedTokenizerFast` with the chat template.

    The special tokens (BOS, EOS, PAD and the chat role tokens) get the first ids, so the chat
    model fine-tuned later shares the base vocabulary unchanged. Encoding adds no BOS by itself:
    callers (the corpus, TransformerLens) prepend it.
    """
    from tokenizers import (  # deferred: the tokenizer libraries load only to train one
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_messages(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    """Messages for `tokenizer.apply_chat_template`: the user turn, plus the answer if given."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


@dataclass
class ChatEncoding:
    """One chat example as token ids, per-token roles (corpus.ROLES codes) and training labels."""

    ids_S: torch.Tensor  # int64 token ids, BOS first
    roles_S: torch.Tensor  # uint8 role codes: bos / user / assistant / template
    labels_S: torch.Tensor  # int64: the token id where it is trained on, -100 elsewhere


def special_ids(tokenizer) -> dict[str, int]:
    """Ids of the framing tokens: bos, eos, user, assistant, end."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("bos", BOS), ("eos", EOS), ("user", USER), ("assistant", ASSISTANT), ("end", END))}
    return ids


def encode_chat(tokenizer, prompt: str, response: str | None = None, *, train_on_end: bool = True) -> ChatEncoding:
    """Token ids of `apply_chat_template(chat_messages(prompt, response))`, built piecewise.

    With no response the encoding ends in the generation prompt (`<|assistant|>`). Labels are
    the answer's tokens (and its closing <|end|> when `train_on_end`); everything else, template
    tokens included, is -100. Labels are not shifted: position i's label is ids[i].
    """
    sp = special_ids(tokenizer)
    pieces: list[tuple[list[int], str, bool]] = [
        ([sp["bos"]], "bos", False),
        ([sp["user"]], "template", False),
        (tokenizer.encode(prompt, add_special_tokens=False), "user", False),
        ([sp["end"], sp["assistant"]], "template", False),
    ]
    if response is not None:
        pieces.append((tokenizer.encode(response, add_special_tokens=False), "assistant", True))
        pieces.append(([sp["end"]], "template", train_on_end))
    ids, roles, labels = [], [], []
    for piece_ids, role, trained in pieces:
        ids.extend(piece_ids)
        roles.extend([ROLE_CODE[role]] * len(piece_ids))
        labels.extend(piece_ids if trained else [-100] * len(piece_ids))
    return ChatEncoding(
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(roles, dtype=torch.uint8),
        torch.tensor(labels, dtype=torch.int64),
    )
