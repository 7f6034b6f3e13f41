"""Greedy rollouts from the chat model with its chat template, and instruction sets."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from sae_transfer.errors import UserError

log = logging.getLogger(__name__)


def rollout_cache_key(model_info: dict, prompts: list[str], max_new_tokens: int) -> str:
    """Hash of what determines a set of rollouts: model identity, prompts, generation length."""
    payload = json.dumps([model_info, prompts, max_new_tokens], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@torch.inference_mode()
def greedy_rollouts(model, prompts: list[str], max_new_tokens: int, device: str | None = None,
                    batch_size: int = 16) -> list[str]:
    """The chat model's greedy reply to each prompt (one user turn), special tokens stripped.

    Prompts are generated `batch_size` at a time, left-padded, with the KV cache: greedy decoding
    of a left-padded batch gives each prompt the reply it gets alone.
    """
    tokenizer = model.tokenizer
    hf = model.original_model
    device = device or next(hf.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [_prompt_ids(tokenizer, p) for p in prompts]
    replies = []
    for start in tqdm(range(0, len(encoded), batch_size), desc="rollouts", leave=False):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids_BS = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask_BS = torch.zeros_like(ids_BS)
        for i, ids in enumerate(chunk):
            ids_BS[i, width - len(ids):] = torch.tensor(ids)
            mask_BS[i, width - len(ids):] = 1
        out = hf.generate(ids_BS.to(device), attention_mask=mask_BS.to(device), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=pad)
        replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return replies


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of one user turn through the chat template, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def load_prompts(source: str, limit: int | None = None, column: str = "prompt") -> list[str]:
    """Prompts from a local JSONL ({"prompt": ...} per line), "demo" (held-out docstrings of the
    built-in corpus), or a Hugging Face dataset id (downloads; only when named)."""
    if source == "demo":
        try:
            from sae_transfer.demo.chat import instruction_pairs
        except ImportError as exc:
            raise UserError("the demo instruction set is not available in this install: pass a JSONL of prompts") from exc
        prompts = [pair.prompt for pair in instruction_pairs("eval")]
    elif source.endswith(".jsonl"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"instruction file {source!r} does not exist: pass a JSONL with one {{\"{column}\": ...}} per line")
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: a line is not JSON ({exc.msg}): write one {{\"prompt\": ...}} object per line") from None
        if rows and column not in rows[0]:
            raise UserError(f"{source} rows have no {column!r} field; fields: {sorted(rows[0])}")
        prompts = [r[column] for r in rows]
    else:
        import datasets

        try:
            ds = datasets.load_dataset(source, split="train")
        except Exception as exc:  # the Hub raises many types
            raise UserError(f"could not open instruction set {source!r}: {str(exc).splitlines()[0]}") from exc
        col = column if column in ds.column_names else "instruction"
        prompts = list(ds[col])
    prompts = [p for p in prompts if p and p.strip()]
    return prompts[:limit] if limit else prompts
