"""The demo chat model: instruction pairs mined from stdlib sources with `ast`, fine-tuning
with loss on the answer only, and greedy rollouts."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from sae_transfer.chat_pairs import InstructionPair, function_pairs
from sae_transfer.corpus import CorpusConfig, iter_documents, split_documents
from sae_transfer.demo.config import DemoPairConfig
from sae_transfer.demo.loop import IGNORE, mean_token_loss, train_loop
from sae_transfer.demo.pretrain import stdlib_corpus
from sae_transfer.demo.tokenizer import ChatEncoding, encode_chat, special_ids
from sae_transfer.errors import UserError

log = logging.getLogger(__name__)


def instruction_pairs(split: str, cfg: DemoPairConfig = DemoPairConfig(),
                      corpus: CorpusConfig | None = None) -> list[InstructionPair]:
    """(docstring -> function) pairs from the corpus documents of `split` ('train' or 'eval').

    The split is the corpus's whole-file split, so held-out pairs come from files the models
    never saw. Default corpus: the stdlib with the config's seed and eval fraction. Order is
    deterministic (by file, then by position in the syntax tree).
    """
    corpus = corpus or stdlib_corpus(cfg)
    pairs: list[InstructionPair] = []
    for doc in split_documents(iter_documents(corpus), corpus, split):
        pairs.extend(function_pairs(doc.doc_id, doc.text, cfg.chat_context_size, cfg.max_docstring_chars,
                                    cfg.with_signature))
    return pairs


def encode_pairs(tokenizer, pairs: list[InstructionPair], cfg: DemoPairConfig) -> list[ChatEncoding]:
    """Chat encodings of the pairs that fit in `chat_context_size` tokens (others dropped)."""
    encoded = (encode_chat(tokenizer, p.prompt, p.response, train_on_end=cfg.train_on_end) for p in pairs)
    return [e for e in encoded if e.ids_S.numel() <= cfg.chat_context_size]


def pad_batch(encodings: list[ChatEncoding], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, S] and labels [B, S] (IGNORE on padding); causal attention never
    lets a real token see the padding after it, so no attention mask is needed."""
    width = max(e.ids_S.numel() for e in encodings)
    ids_BS = torch.full((len(encodings), width), pad_id, dtype=torch.int64)
    labels_BS = torch.full((len(encodings), width), IGNORE, dtype=torch.int64)
    for row, e in enumerate(encodings):
        ids_BS[row, : e.ids_S.numel()] = e.ids_S
        labels_BS[row, : e.ids_S.numel()] = e.labels_S
    return ids_BS, labels_BS


def finetune_chat(
    cfg: DemoPairConfig,
    model: torch.nn.Module,
    tokenizer,
    train: list[ChatEncoding],
    *,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune `model` in place on chat encodings; returns per-step training losses (nats)."""
    if not train:
        raise UserError("no instruction pairs fit in chat_context_size: raise it or use a larger corpus")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    lengths_N = torch.tensor([e.ids_S.numel() for e in train], dtype=torch.float64)
    queue: list[list[int]] = []

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not queue:  # new epoch: batches of similar length (little padding), in random order
            jitter_N = torch.rand(len(train), generator=gen, dtype=torch.float64) * 16
            by_length = torch.argsort(lengths_N + jitter_N).tolist()
            batches = [by_length[i:i + cfg.chat_batch] for i in range(0, len(by_length), cfg.chat_batch)]
            queue.extend(batches[i] for i in torch.randperm(len(batches), generator=gen).tolist())
        return pad_batch([train[i] for i in queue.pop()], tokenizer.pad_token_id)

    return train_loop(
        model, batch_fn, steps=cfg.chat_steps, lr=cfg.chat_lr, warmup=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, desc="fine-tune chat", on_step=on_step, progress=progress,
    )


def assistant_loss(model: torch.nn.Module, encodings: list[ChatEncoding], pad_id: int, batch: int = 16) -> float:
    """Mean next-token loss (nats) over the answer tokens (the trained labels) of `encodings`."""
    total, count = 0.0, 0
    for start in range(0, len(encodings), batch):
        chunk = encodings[start:start + batch]
        ids_BS, labels_BS = pad_batch(chunk, pad_id)
        n = int((labels_BS[:, 1:] != IGNORE).sum())
        total += mean_token_loss(model, ids_BS, labels_BS, batch=batch) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def greedy_rollout(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy answer to `prompt` through the chat template, stopping at <|end|>."""
    ids_1S = encode_chat(tokenizer, prompt).ids_S[None]  # == apply_chat_template(..., add_generation_prompt=True)
    sp = special_ids(tokenizer)
    out_1S = model.generate(
        ids_1S, attention_mask=torch.ones_like(ids_1S), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=[sp["end"], sp["eos"]], pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out_1S[0, ids_1S.shape[1]:], skip_special_tokens=True)
