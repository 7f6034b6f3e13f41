"""The demo base/chat pair, built from a tiny config through the same code as the real one."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace

import pytest
import torch

from sae_transfer.corpus import ROLE_CODE, CorpusConfig
from sae_transfer.demo import (
    PRESETS,
    DemoPairConfig,
    build_demo_pair,
    chat_messages,
    checkpoint_steps,
    demo_paths,
    encode_chat,
    instruction_pairs,
)
from sae_transfer.demo.build import _is_built
from sae_transfer.demo.loop import IGNORE, lr_at, mean_token_loss, train_loop, unigram_loss

TINY = PRESETS["tiny"]  # the smoke-test preset, built through the same code as the real pair


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_pair(out, TINY, progress=False)


def test_layout_and_manifest(tiny_pair):
    out, report = tiny_pair
    paths = demo_paths(out)
    for folder in [paths.base, paths.chat, *paths.checkpoint_dirs()]:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), folder / name
    assert [p.name for p in paths.checkpoint_dirs()] == ["step-000002", "step-000004", "step-000006", "step-000008"]
    assert report.checkpoint_steps == checkpoint_steps(TINY) == [2, 4, 6, 8]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # every write was renamed into place
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["config_hash"] == TINY.hash() and manifest["report"]["hook"] == "blocks.1.hook_resid_pre"
    assert set(report.losses) == {"unigram_heldout", "base_heldout", "base_assistant_heldout", "chat_heldout",
                                  "chat_assistant_heldout"}
    assert all(v > 0 for v in report.losses.values()) and len(report.rollouts) == 2
    assert not report.skipped and report.n_pairs["train"] > 0


def test_second_build_is_skipped_and_config_changes_rebuild(tiny_pair):
    out, report = tiny_pair
    stamp = demo_paths(out).manifest.stat().st_mtime_ns
    again = build_demo_pair(out, replace(TINY, num_threads=2), progress=False)  # threads: not in the hash
    assert again.skipped and again.losses == report.losses
    assert demo_paths(out).manifest.stat().st_mtime_ns == stamp
    assert _is_built(demo_paths(out), replace(TINY, chat_steps=9)) is None
    assert TINY.hash() != replace(TINY, seed=1).hash()


def test_build_is_deterministic(tiny_pair, tmp_path):
    out, report = tiny_pair
    small = replace(TINY, chat_steps=4)  # shorter second build; pretraining is identical
    again = build_demo_pair(tmp_path, small, progress=False)
    base_a = (demo_paths(out).base / "model.safetensors").read_bytes()
    base_b = (demo_paths(tmp_path).base / "model.safetensors").read_bytes()
    assert base_a == base_b
    assert (demo_paths(out).base / "tokenizer.json").read_bytes() == (demo_paths(tmp_path).base / "tokenizer.json").read_bytes()
    assert again.losses["base_heldout"] == report.losses["base_heldout"]
    chat_a = (demo_paths(out).checkpoint(4) / "model.safetensors").read_bytes()
    assert chat_a != (demo_paths(tmp_path).chat / "model.safetensors").read_bytes()  # other schedule


def test_chat_template_matches_encode_chat_and_masks_labels(tiny_pair):
    from transformers import AutoTokenizer

    out, _ = tiny_pair
    tok = AutoTokenizer.from_pretrained(demo_paths(out).checkpoint(2))
    enc = encode_chat(tok, "Return the sum.", "def f(a, b):\n    return a + b")
    rendered = tok.apply_chat_template(chat_messages("Return the sum.", "def f(a, b):\n    return a + b"), tokenize=True)
    rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    assert enc.ids_S.tolist() == list(rendered)
    prompt = tok.apply_chat_template(chat_messages("Return the sum."), add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|user|>Return the sum.<|end|><|assistant|>"
    assert encode_chat(tok, "Return the sum.").ids_S.tolist() == tok.encode(prompt, add_special_tokens=False)
    trained = enc.labels_S != IGNORE
    roles = enc.roles_S
    assert (roles[trained][:-1] == ROLE_CODE["assistant"]).all()  # the answer, then its closing <|end|>
    assert tok.convert_ids_to_tokens(int(enc.ids_S[trained][-1])) == "<|end|>"
    assert (enc.labels_S[roles == ROLE_CODE["user"]] == IGNORE).all()
    assert roles[0] == ROLE_CODE["bos"] and tok.decode(enc.ids_S[roles == ROLE_CODE["user"]]) == "Return the sum."
    no_end = encode_chat(tok, "x", "y", train_on_end=False)
    assert (no_end.labels_S[no_end.roles_S == ROLE_CODE["template"]] == IGNORE).all()


def test_models_boot_through_the_bridge(tiny_pair):
    from sae_transfer.models import check_hooks, load_model

    out, report = tiny_pair
    for folder in (demo_paths(out).base, demo_paths(out).checkpoint_dirs()[0]):
        bridge = load_model(str(folder), device="cpu")
        check_hooks(bridge, [report.hook])
        ids = bridge.to_tokens("def f(x):\n    return x")
        assert ids[0, 0].item() == bridge.tokenizer.convert_tokens_to_ids("<|bos|>") and ids[0, 1].item() != ids[0, 0].item()
        assert bridge.cfg.n_layers == TINY.n_layers and bridge.cfg.d_model == TINY.d_model


def test_instruction_pairs_from_sources(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(30):
        (root / f"m{i}.py").write_text(textwrap.dedent(f'''
            class C{i}:
                def method(self, x, y=2):
                    """Add {i} to x."""
                    return x + {i}

            def nodoc(): return 1

            def broken(:
        ''') if i == 0 else textwrap.dedent(f'''
            def f{i}(a, *, b=None):
                """Return a plus {i}."""
                return a + {i}
        '''))
    corpus = CorpusConfig(source=str(root), eval_fraction=0.3, seed=0)
    train, held = instruction_pairs("train", TINY, corpus), instruction_pairs("eval", TINY, corpus)
    assert train and held and not {p.source_file for p in train} & {p.source_file for p in held}
    assert len(train) + len(held) == 29  # m0.py does not parse; one pair per other file
    pair = next(p for p in train + held if p.source_file == "m1.py")
    assert pair.prompt == "Return a plus 1.\nSignature: f1(a, *, b=None)"
    assert pair.response == 'def f1(a, *, b=None):\n    """Return a plus 1."""\n    return a + 1'
    no_sig = instruction_pairs("train", replace(TINY, with_signature=False), corpus)
    assert all("Signature" not in p.prompt for p in no_sig)


def test_loss_helpers_exact():
    targets = torch.tensor([[0, 1, 1, 2]])
    train = torch.tensor([0, 1, 1, 2, 2, 2])  # counts + 1: 2, 3, 4 of 9
    expected = -(torch.log(torch.tensor([2 / 9, 3 / 9, 3 / 9, 4 / 9]))).mean().item()
    assert unigram_loss(train, targets, vocab_size=3) == pytest.approx(expected)
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10) == pytest.approx(0.1, abs=1e-3)


def test_training_lowers_loss_and_mean_loss_ignores_masked():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    ids_BS = torch.arange(12).repeat(4, 1) % 16
    labels_BS = ids_BS.clone()
    labels_BS[:, :6] = IGNORE
    before = mean_token_loss(model, ids_BS, labels_BS)
    losses = train_loop(model, lambda step: (ids_BS, labels_BS), steps=30, lr=1e-2, warmup=2,
                        weight_decay=0.0, desc="t", progress=False)
    assert losses[-1] < 0.5 * losses[0]
    assert mean_token_loss(model, ids_BS, labels_BS) < 0.5 * before
    logits = model(input_ids=ids_BS).logits[:, :-1]
    manual = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 16), ids_BS[:, 6:].reshape(-1))
    assert mean_token_loss(model, ids_BS, labels_BS) == pytest.approx(manual.item(), rel=1e-5)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_heads"):
        DemoPairConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="chat_steps"):
        DemoPairConfig(chat_steps=0)
