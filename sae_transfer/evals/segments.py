"""Segment masks of chat transcripts: which tokens are the user prompt, the assistant's
rollout, or the chat template's role/control tokens. Works for any chat template: the
conversation is rendered to text, each message's content is located in it, and tokens are
assigned by their character offsets."""

from __future__ import annotations

import torch

from sae_transfer.corpus import ROLE_CODE
from sae_transfer.errors import UserError

# Segment names in the metrics table, by corpus role code.
SEGMENT_OF_ROLE = {"user": "user_prompt", "assistant": "rollout", "template": "template"}
SEGMENTS = tuple(SEGMENT_OF_ROLE.values())


def _content_spans(text: str, messages: list[dict]) -> list[tuple[int, int, str]]:
    """(start, end, role) of each message's content in the rendered text, found in order."""
    spans, cursor = [], 0
    for msg in messages:
        content = msg["content"]
        if not content:
            continue
        start = text.find(content, cursor)
        if start < 0:
            raise UserError(
                f"chat template does not render message content verbatim ({content[:40]!r}): "
                "segment masks need a template that keeps message text unchanged"
            )
        spans.append((start, start + len(content), msg["role"]))
        cursor = start + len(content)
    return spans


def transcript_roles(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, ROLE codes) of a rendered conversation.

    A token is `user`/`assistant` when its characters lie entirely inside that message's
    content, `bos` when it is a prepended BOS, and `template` otherwise (role markers,
    control tokens, and tokens straddling a content boundary). A BOS is prepended when the
    tokenizer has one and the rendered text does not already start with it.
    """
    return _rendered_roles(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False), messages)


def prompt_roles(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """(token ids, ROLE codes) of one user turn rendered with the generation prompt: the ids a
    rollout is generated from, and the first part of its transcript."""
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _rendered_roles(tokenizer, text, messages)


def rollout_transcript(prompt_ids: list[int], prompt_role_codes: list[int], reply_ids: list[int],
                       special: set[int]) -> tuple[list[int], list[int]]:
    """(token ids, ROLE codes) of a prompt followed by the model's generated reply ids, as
    generated: reply tokens are `assistant`, special tokens among them (the stop token) `template`."""
    assert len(prompt_ids) == len(prompt_role_codes), "prompt ids and roles differ in length"
    reply_roles = [ROLE_CODE["template"] if t in special else ROLE_CODE["assistant"] for t in reply_ids]
    return list(prompt_ids) + list(reply_ids), list(prompt_role_codes) + reply_roles


def _rendered_roles(tokenizer, text: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of rendered `text` and each token's ROLE code (see `transcript_roles`)."""
    spans = _content_spans(text, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, roles = list(enc["input_ids"]), []
    for a, b in enc["offset_mapping"]:
        role = "template"
        for start, end, msg_role in spans:
            if start <= a and b <= end and b > a:
                role = msg_role if msg_role in ("user", "assistant") else "template"
                break
        roles.append(ROLE_CODE[role])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, roles = [bos] + ids, [ROLE_CODE["bos"]] + roles
    elif bos is not None:
        roles[0] = ROLE_CODE["bos"]
    return ids, roles


def pad_transcripts(transcripts: list[tuple[list[int], list[int]]], pad_id: int, max_len: int | None = None):
    """Right-pad to [N, S]: (tokens_NS int64, roles_NS uint8, valid_NS bool). Truncates at max_len."""
    length = max(len(ids) for ids, _ in transcripts)
    if max_len is not None:
        length = min(length, max_len)
    n = len(transcripts)
    tokens = torch.full((n, length), pad_id, dtype=torch.int64)
    roles = torch.full((n, length), ROLE_CODE["template"], dtype=torch.uint8)
    valid = torch.zeros((n, length), dtype=torch.bool)
    for i, (ids, rs) in enumerate(transcripts):
        k = min(len(ids), length)
        tokens[i, :k] = torch.tensor(ids[:k])
        roles[i, :k] = torch.tensor(rs[:k], dtype=torch.uint8)
        valid[i, :k] = True
    return tokens, roles, valid


def segment_mask(roles_NS: torch.Tensor, valid_NS: torch.Tensor, segment: str) -> torch.Tensor:
    """Positions of `segment` ("user_prompt", "rollout" or "template")."""
    role = {v: k for k, v in SEGMENT_OF_ROLE.items()}[segment]
    return (roles_NS == ROLE_CODE[role]) & valid_NS
