"""The study's configs and real data paths, offline: the shipped study configs carry the
study's published settings, the Pile streams through the Hub-dataset path, and Alpaca rows
become the study's prompts (through the Hub path, a local JSONL and a local Parquet alike)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_transfer.corpus import iter_documents, split_documents
from sae_transfer.evals import api
from sae_transfer.evals.rollouts import ALPACA_SHUFFLE_SEED, load_prompts
from sae_transfer.evals.segments import prompt_roles
from sae_transfer.report.published import published_pair
from sae_transfer.study import example_config, load_study

D_MODEL = {"mistral-7b": 4096, "qwen1.5-0.5b": 1024, "gemma-2b": 2048}  # the models' published hidden sizes
STUDY_PROMPTS = 55  # instructions in each of the study's generated_data_*.pkl


@pytest.mark.parametrize("name", sorted(D_MODEL))
def test_study_configs_carry_the_published_settings(name):
    cfg = load_study(example_config(name))
    pub = published_pair(cfg.pair.base, cfg.pair.chat)
    assert pub is not None, f"{name}: no published entry for {cfg.pair.base} / {cfg.pair.chat}"
    assert cfg.hooks == [pub["hook"]]
    assert cfg.sae.expansion * D_MODEL[name] == pub["d_sae"]
    assert cfg.outliers.rule == "absolute" and cfg.outliers.threshold == pub["outlier_threshold"]
    assert cfg.eval.tokens == pub["eval_tokens"]
    assert cfg.eval.tokens % cfg.corpus.context_size == 0  # whole sequences, as the study's 48 per eval
    assert (cfg.sae.arch, cfg.sae.l1_coefficient, cfg.sae.lr, cfg.sae.batch_size) == ("relu", 5.0, 5e-5, 4096)
    assert (cfg.finetune.tokens, cfg.finetune.batch_size) == (5_000_000, 256)
    assert cfg.corpus.source == "monology/pile-uncopyrighted" and cfg.corpus.text_column == "text"
    assert (cfg.instructions.source, cfg.instructions.n_prompts, cfg.instructions.max_new_tokens) == (
        "tatsu-lab/alpaca", STUDY_PROMPTS, 64)


def test_every_shipped_config_validates():
    for path in example_config("demo").parent.glob("*.yaml"):
        assert load_study(path).hooks


def _redirect_load_dataset(monkeypatch, hub_id: str, files: str, builder: str = "parquet") -> list[dict]:
    """Make `datasets.load_dataset(hub_id, ...)` read local `files` with the same split and
    streaming arguments; returns the calls seen (the code under test is unchanged)."""
    import datasets

    real, calls = datasets.load_dataset, []

    def fake(path, name=None, *args, split=None, streaming=False, **kw):
        if path != hub_id:
            return real(path, name, *args, split=split, streaming=streaming, **kw)
        calls.append({"name": name, "split": split, "streaming": streaming})
        return real(builder, data_files={"train": files}, split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def test_the_pile_streams_through_the_hub_path(tmp_path, monkeypatch):
    """A local Parquet shaped like monology/pile-uncopyrighted (`text`, `meta`) read by the corpus
    code exactly as the study configs name it: streamed train split, `text` column."""
    texts = [f"Document {i} of the Pile. " + "word " * (i % 7 + 3) for i in range(40)]
    meta = [{"pile_set_name": ["Pile-CC", "PubMed Central", "Github"][i % 3]} for i in range(40)]
    path = tmp_path / "pile.parquet"
    pq.write_table(pa.table({"text": texts, "meta": meta}), path)
    cfg = load_study(example_config("mistral-7b"))
    calls = _redirect_load_dataset(monkeypatch, cfg.corpus.source, str(path))
    corpus = api._corpus(cfg.text)  # what the evaluation steps read of the study corpus
    docs = list(iter_documents(corpus))
    assert [d.text for d in docs] == texts
    assert calls and all(c == {"name": None, "split": "train", "streaming": True} for c in calls)
    held_out = {d.text for d in split_documents(iter_documents(corpus), corpus, "eval")}
    train = {d.text for d in split_documents(iter_documents(corpus), corpus, "train")}
    assert held_out and train and not held_out & train and held_out | train == set(texts)


def _alpaca_rows(n: int = 60) -> list[dict]:
    rows = []
    for i in range(n):
        has_input = i % 5 in (1, 3)  # about 40% of Alpaca rows have an input, as the real set
        rows.append({"instruction": f"Instruction number {i}.", "input": f"input text {i}" if has_input else "",
                     "output": f"answer {i}", "text": f"Below is an instruction ... {i}"})
    rows[7]["input"] = "   "  # whitespace only counts as empty (the study: `input.strip() == ''`)
    return rows


def _study_order(rows: list[dict], limit: int) -> list[str]:
    """The study's rule written out independently: `Dataset.shuffle(seed=42)` is the permutation
    numpy.random.default_rng(42) draws; keep rows whose input is blank; their instruction."""
    order = np.random.default_rng(ALPACA_SHUFFLE_SEED).permutation(len(rows))
    return [rows[i]["instruction"] for i in order if not rows[i]["input"].strip()][:limit]


def test_alpaca_rows_become_the_studys_prompts_on_every_path(tmp_path, monkeypatch):
    rows = _alpaca_rows()
    jsonl = tmp_path / "alpaca.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    calls = _redirect_load_dataset(monkeypatch, "tatsu-lab/alpaca", str(parquet))
    want = _study_order(rows, 20)
    assert len(want) == 20 and want != [r["instruction"] for r in rows if not r["input"].strip()][:20]  # shuffled
    hub = load_prompts("tatsu-lab/alpaca", 20)
    assert calls == [{"name": None, "split": "train", "streaming": False}]
    assert hub == want
    assert load_prompts(str(jsonl), 20) == want
    assert load_prompts(str(parquet), 20) == want
    assert not any("input text" in p for p in hub)  # rows with an input are left out, as the study did
    assert "Instruction number 7." in _study_order(rows, len(rows)) and len(load_prompts(str(jsonl))) == 36


def test_plain_prompt_files_keep_their_order(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["b", "a", " ", "c"]))
    assert load_prompts(str(path)) == ["b", "a", "c"]
    assert load_prompts(str(path), 2) == ["b", "a"]


# Gemma-IT's own chat template (tokenizer_config.json of google/gemma-2b-it), with a test tokenizer.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
STUDY_GEMMA_FORMAT = "<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n"  # the study's utils.py


def test_an_alpaca_prompt_reaches_the_model_through_its_chat_template(tmp_path):
    """Downstream, a prompt is one user turn through the chat model's own template: for Gemma-IT
    that is the study's hand-written Gemma format, BOS first."""
    from tests._tiny import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = GEMMA_TEMPLATE
    instruction = "Calculate the atomic mass for lithium."
    ids, roles = prompt_roles(tok, instruction)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == STUDY_GEMMA_FORMAT.format(instruction=instruction)
