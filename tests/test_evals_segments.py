"""Segment masks of a hand-built chat transcript, and rollout cache keys."""

from __future__ import annotations

import pytest

from sae_transfer.corpus import ROLE_CODE
from sae_transfer.errors import UserError
from sae_transfer.evals.rollouts import rollout_cache_key
from sae_transfer.evals.segments import pad_transcripts, segment_mask, transcript_roles
from tests._tiny import build_tokenizer

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer(300)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    return tok


def test_segment_masks_select_exact_positions(tokenizer):
    user, reply = "Return the sum of a and b.", "def add(a, b):\n    return a + b"
    ids, roles = transcript_roles(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
    pieces = [tokenizer.decode([i]) for i in ids]
    by_role = {name: [p for p, r in zip(pieces, roles) if r == code] for name, code in ROLE_CODE.items()}
    assert ids[0] == tokenizer.bos_token_id and roles[0] == ROLE_CODE["bos"] and roles.count(ROLE_CODE["bos"]) == 1
    assert "".join(by_role["user"]) == user
    assert "".join(by_role["assistant"]) == reply
    assert by_role["template"] == ["<|user|>", "\n", "<|end|>", "\n", "<|assistant|>", "\n", "<|end|>", "\n"]
    # positions are contiguous runs in order: bos, template, user..., template, template, template, assistant...
    first_assistant = roles.index(ROLE_CODE["assistant"])
    last_user = len(roles) - 1 - roles[::-1].index(ROLE_CODE["user"])
    assert last_user < first_assistant and roles[last_user + 1 : first_assistant] == [ROLE_CODE["template"]] * 4


def test_padding_and_segment_mask(tokenizer):
    a = transcript_roles(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x = 1"}])
    b = transcript_roles(tokenizer, [{"role": "user", "content": "a longer request here"}, {"role": "assistant", "content": "y"}])
    tokens, roles, valid = pad_transcripts([a, b], pad_id=tokenizer.pad_token_id)
    assert tokens.shape == (2, max(len(a[0]), len(b[0])))
    assert int(valid[0].sum()) == len(a[0]) and int(valid[1].sum()) == len(b[0])
    rollout = segment_mask(roles, valid, "rollout")
    assert int(rollout.sum()) == sum(r == ROLE_CODE["assistant"] for r in a[1] + b[1])
    assert not (segment_mask(roles, valid, "template") & ~valid).any()


def test_template_that_rewrites_content_is_refused(tokenizer):
    tokenizer = build_tokenizer(300)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(UserError, match="verbatim"):
        transcript_roles(tokenizer, [{"role": "user", "content": "lower"}])


def test_rollout_cache_key_depends_on_everything():
    info = {"model_id": "m", "model_revision": "r"}
    key = rollout_cache_key(info, ["a", "b"], 16)
    assert key == rollout_cache_key(dict(info), ["a", "b"], 16)
    assert len({key, rollout_cache_key(info, ["a"], 16), rollout_cache_key(info, ["a", "b"], 8),
                rollout_cache_key({**info, "model_revision": "s"}, ["a", "b"], 16)}) == 4
