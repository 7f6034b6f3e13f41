"""Pretraining the demo base model: a small Llama-style causal LM on stdlib sources."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sae_transfer.corpus import CorpusConfig, iter_documents, split_documents, tokenize_sequences
from sae_transfer.demo.config import DemoPairConfig
from sae_transfer.demo.loop import mean_token_loss, train_loop, unigram_loss
from sae_transfer.demo.tokenizer import special_ids, train_tokenizer

log = logging.getLogger(__name__)


def stdlib_corpus(cfg: DemoPairConfig) -> CorpusConfig:
    """The corpus both demo models learn from: stdlib `.py` files, split by whole file."""
    return CorpusConfig(source="stdlib", eval_fraction=cfg.eval_fraction, seed=cfg.seed, max_docs=cfg.max_docs)


def build_tokenizer(cfg: DemoPairConfig, corpus: CorpusConfig):
    """BPE tokenizer trained on the corpus's train split only (held-out files stay unseen)."""
    texts = [doc.text for doc in split_documents(iter_documents(corpus), corpus, "train")]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    return tokenizer


def build_model(cfg: DemoPairConfig, tokenizer) -> torch.nn.Module:
    """A randomly initialised Llama-style causal LM (RoPE, RMSNorm, SwiGLU, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: transformers takes seconds to import

    ids = special_ids(tokenizer)
    hf_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=max(cfg.context_size, cfg.chat_context_size),
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(hf_cfg)


@dataclass
class PretrainResult:
    """The trained base model and its held-out numbers."""

    model: torch.nn.Module
    train_tokens: int  # tokens in the packed train split
    tokens_seen: int  # tokens consumed by the optimiser (may exceed one epoch)
    eval_ids_NS: torch.Tensor  # held-out stdlib sequences scored in the report
    eval_loss: float  # base next-token loss on them, nats per token
    unigram_loss: float  # train-unigram cross-entropy on the same targets, nats per token


def pretrain(cfg: DemoPairConfig, tokenizer, corpus: CorpusConfig, *, progress: bool = True) -> PretrainResult:
    """Train the base model on packed train-split sequences; score it on held-out files."""
    train = tokenize_sequences(corpus, tokenizer, context_size=cfg.context_size, split="train")
    evals = tokenize_sequences(corpus, tokenizer, context_size=cfg.context_size, split="eval")
    eval_ids_NS = evals.tokens_NS[: max(1, cfg.eval_tokens // cfg.context_size)]
    tokens_NS = train.tokens_NS
    n_seqs = tokens_NS.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(order) < cfg.pretrain_batch:  # epochs of shuffled sequences, no repeats within one
            order.extend(torch.randperm(n_seqs, generator=gen).tolist())
        rows = [order.pop() for _ in range(cfg.pretrain_batch)]
        ids_BS = tokens_NS[rows]
        return ids_BS, ids_BS

    model = build_model(cfg, tokenizer)
    log.info("pretraining %.2fM params on %d train tokens", sum(p.numel() for p in model.parameters()) / 1e6, train.n_tokens)
    train_loop(
        model, batch_fn, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, warmup=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, desc="pretrain base", progress=progress,
    )
    return PretrainResult(
        model=model,
        train_tokens=train.n_tokens,
        tokens_seen=cfg.pretrain_steps * cfg.pretrain_batch * cfg.context_size,
        eval_ids_NS=eval_ids_NS,
        eval_loss=mean_token_loss(model, eval_ids_NS, eval_ids_NS),
        unigram_loss=unigram_loss(tokens_NS[:, 1:], eval_ids_NS[:, 1:], len(tokenizer)),
    )
