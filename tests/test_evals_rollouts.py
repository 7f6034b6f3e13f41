"""Rollouts are the chat model's own greedy tokens, scored as generated.

The reference is written here, independently of `evals.rollouts`: the prompt through the chat
template (Hugging Face's own tokenisation, BOS prepended when the template has none, as the study
does), a plain `AutoModelForCausalLM.generate` over the same left-padded batch, the reply cut after
the first stop token. The study's transcripts (`evals.run.chat_transcripts`, what the segment
metrics score) must hold exactly those ids. Every model family is checked in `test_families.py`
through `assert_rollouts_are_plain_greedy` below.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from sae_transfer.corpus import ROLE_CODE
from sae_transfer.errors import UserError
from sae_transfer.evals import rollouts
from sae_transfer.evals.run import chat_transcripts, segment_records
from sae_transfer.evals.segments import segment_mask
from sae_transfer.evals.transfer import EvalConfig
from sae_transfer.models import load_model

CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)
PROMPTS = ["Add two numbers.", "Sort a list of items by their key, newest first.", "x", "Write a function.", "Why?"]
INFO = {"model_id": "chat-under-test", "model_revision": "sha256:test"}


def plain_greedy(folder, prompts: list[str], max_new_tokens: int, device: str = "cpu") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids through the first stop token) per prompt, from plain transformers:
    one left-padded batch, as `chat_transcripts` generates up to 16 prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    encoded = []
    for p in prompts:
        ids = list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                           return_dict=False))
        encoded.append(ids if tok.bos_token_id is None or ids[:1] == [tok.bos_token_id] else [tok.bos_token_id, *ids])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = hf.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id} - {None}
    n_ctx = hf.config.max_position_embeddings  # the study leaves out prompts whose reply would not fit
    encoded = [e for e in encoded if len(e) + max_new_tokens <= n_ctx]
    width = max(map(len, encoded))
    ids_BS = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask_BS = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.no_grad():
        out = hf.generate(ids_BS.to(device), attention_mask=mask_BS.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=sorted(stops), pad_token_id=pad)
    rows = []
    for e, gen in zip(encoded, out[:, width:].cpu().tolist()):
        cut = next((i + 1 for i, t in enumerate(gen) if t in stops), len(gen))
        rows.append((e, gen[:cut]))
    return rows


def assert_rollouts_are_plain_greedy(folder, results_dir, prompts=PROMPTS, max_new_tokens: int = 10, device: str = "cpu") -> None:
    """The study's transcripts of `folder` (booted through the bridge) hold exactly the plain
    greedy ids, and the rollout segment covers the generated tokens."""
    want = plain_greedy(folder, prompts, max_new_tokens, device)
    model = load_model(str(folder), device=device)
    toks = chat_transcripts(model, rollouts.rollouts_of(model, INFO, prompts, max_new_tokens))
    got = [row[valid].tolist() for row, valid in zip(toks.tokens_NS, toks.valid_NS)]
    assert got == [prompt + reply for prompt, reply in want]
    rollout_NS = segment_mask(toks.roles_NS, toks.valid_NS, "rollout")
    special = set(model.tokenizer.all_special_ids)
    for row, roles, (prompt, reply) in zip(toks.tokens_NS, rollout_NS, want):
        # the rollout segment is exactly the generated tokens, the stop token aside
        assert row[roles].tolist() == [t for t in reply if t not in special]
        assert not roles[:len(prompt)].any()


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    from tests._tiny import tiny_model_dir

    folder = tiny_model_dir(tmp_path_factory.mktemp("rollouts"), name="chat", seed=1)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def test_rollouts_equal_plain_greedy_decode(tiny_chat, tmp_path):
    assert_rollouts_are_plain_greedy(tiny_chat, tmp_path / "results")


@pytest.mark.cuda
def test_rollouts_on_cuda_equal_plain_greedy_decode_on_cuda(tiny_chat, tmp_path):
    # generation runs on the device the bridge was loaded on; ids come back to the host for the table
    assert_rollouts_are_plain_greedy(tiny_chat, tmp_path / "results", device="cuda")


def test_rollout_record_round_trips_as_json_and_rows_hold_the_generated_ids(tiny_chat):
    # the record travels between DAG steps as Prefect's JSON result: what comes back scores the same tokens
    model = load_model(str(tiny_chat), device="cpu")
    made = rollouts.rollouts_of(model, INFO, PROMPTS, 8)
    again = rollouts.Rollouts.model_validate_json(made.model_dump_json())
    assert again == made
    first, second = chat_transcripts(model, made), chat_transcripts(model, again)
    assert torch.equal(first.tokens_NS, second.tokens_NS) and torch.equal(first.roles_NS, second.roles_NS)
    rows = made.rows()
    assert [r["completion_ids"] for r in rows] == [r.reply_ids for r in made.made]
    assert len(rows) == len(PROMPTS) and all(len(r["completion_ids"]) > 0 for r in rows)


def test_bridge_is_restored_after_generation(tiny_chat):
    model = load_model(str(tiny_chat), device="cpu")
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids, return_type="logits")
        rollouts.greedy_rollouts(model, PROMPTS[:2], 4)
        after = model(ids, return_type="logits")
        seen = []
        model.run_with_hooks(ids, return_type=None, fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook=None: seen.append(1))])
    assert torch.equal(before, after) and seen == [1]  # same modules back: hooks fire again


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """The demo pair's tiny preset trained long enough that the chat model answers (about 10 s)."""
    from sae_transfer.demo import PRESETS, build_demo_pair, demo_paths

    out = tmp_path_factory.mktemp("pair")
    build_demo_pair(out, replace(PRESETS["tiny"], pretrain_steps=150, chat_steps=80), progress=False)
    return demo_paths(out)


def test_chat_model_predicts_its_own_rollouts_best(trained_pair, tmp_path):
    from sae_transfer.evals.rollouts import load_prompts

    assert_rollouts_are_plain_greedy(trained_pair.chat, tmp_path / "check", prompts=load_prompts("demo", 6), max_new_tokens=16)
    chat = load_model(str(trained_pair.chat), device="cpu")
    toks = chat_transcripts(chat, rollouts.rollouts_of(chat, INFO, load_prompts("demo", 8), 24))
    ce = {}
    for name, folder in (("chat", trained_pair.chat), ("base", trained_pair.base)):
        model = load_model(str(folder), device="cpu")
        rows = segment_records(model, INFO, [_lossless()], toks, "blocks.1.hook_resid_pre",
                               EvalConfig(device="cpu", n_bootstrap=10), _reference(model, toks))
        ce[name] = next(r["ce_clean"] for r in rows if r["segment"] == "rollout")
    ln_vocab = math.log(chat.cfg.d_vocab)
    assert ce["chat"] < ce["base"] and ce["chat"] < 0.6 * ln_vocab, (ce, ln_vocab)


def _lossless():
    from sae_transfer.evals.loading import LoadedSAE
    from tests.test_evals_metrics import lossless_sae

    return LoadedSAE(lossless_sae(32), {"sae_id": "lossless", "sae_model": None, "sae_finetuned_from": None}, None, "lossless")


def _reference(model, toks):
    from sae_transfer.evals import transfer

    return transfer.norm_pass(model, toks, "blocks.1.hook_resid_pre", EvalConfig(device="cpu"))


def _anti_greedy(model, prompts, max_new_tokens, batch_size=16):
    """Replies of the least likely token at every step: each has probability at most 1/vocab."""
    from sae_transfer.evals.segments import prompt_roles

    out = []
    for p in prompts:
        ids = prompt_roles(model.tokenizer, p)[0]
        reply = []
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([ids + reply]), return_type="logits")[0, -1]
                reply.append(int(logits.argmin()))
        out.append(rollouts.Rollout(ids, reply, ""))
    return out


def test_rollouts_the_model_would_not_generate_fail_the_step(trained_pair, tmp_path, monkeypatch):
    chat = load_model(str(trained_pair.chat), device="cpu")
    monkeypatch.setattr(rollouts, "greedy_rollouts", _anti_greedy)
    made = rollouts.Rollouts(key="k", model_info=INFO, max_new_tokens=6, prompts=PROMPTS[:3],
                             made=_anti_greedy(chat, PROMPTS[:3], 6))
    toks = chat_transcripts(chat, made)
    with pytest.raises(UserError, match=r"chat-under-test's own greedy rollouts is .* above ln\(vocab\)") as err:
        segment_records(chat, INFO, [_lossless()], toks, "blocks.1.hook_resid_pre", EvalConfig(device="cpu", n_bootstrap=10),
                        _reference(chat, toks))
    assert "\n" not in str(err.value)


def test_one_repeated_token_fails_before_any_row(tiny_chat, tmp_path, monkeypatch):
    model = load_model(str(tiny_chat), device="cpu")
    monkeypatch.setattr(rollouts, "greedy_rollouts",
                        lambda m, prompts, n, batch_size=16: [rollouts.Rollout([1, 5], [42] * n, "") for _ in prompts])
    with pytest.raises(UserError, match="one token .* repeated over 5 prompts"):
        rollouts.rollouts_of(model, INFO, PROMPTS, 8)  # no record, so no later step can score them


def test_checks_pass_real_rollouts():
    varied = [rollouts.Rollout([1], [5, 6, 7, 2], "a"), rollouts.Rollout([1], [5, 5, 2], "b")]
    rollouts.check_rollouts(varied, [2], "m")
    rollouts.check_rollouts([rollouts.Rollout([1], [2], "")], [2], "m")  # an immediate stop is an answer
    rollouts.check_rollout_ce(math.log(4096) - 1e-9, 4096, "m")
    with pytest.raises(UserError):
        rollouts.check_rollout_ce(float("nan"), 4096, "m")


def test_reply_stops_at_first_stop_token():
    assert rollouts.reply_until_stop([5, 6, 2, 0, 0], [2]) == [5, 6, 2]
    assert rollouts.reply_until_stop([5, 6, 7], [2]) == [5, 6, 7]
    assert ROLE_CODE["assistant"] != ROLE_CODE["template"]


def test_prompts_past_the_context_are_left_out(tiny_chat, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat)
    lengths = [len(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                           return_dict=False)) + 1 for p in PROMPTS]  # + BOS, which this template leaves out
    n_ctx = sorted(lengths)[2] + 6  # the three shortest prompts fit with 6 new tokens
    kept = rollouts.prompts_that_fit(tok, PROMPTS, 6, n_ctx, "m")
    assert kept == [p for p, n in zip(PROMPTS, lengths) if n + 6 <= n_ctx] and len(kept) == 3
    assert "2 of 5 prompts left out" in caplog.text
    with pytest.raises(UserError, match="no prompt fits m's context of 4 tokens with max_new_tokens=6"):
        rollouts.prompts_that_fit(tok, PROMPTS, 6, 4, "m")
