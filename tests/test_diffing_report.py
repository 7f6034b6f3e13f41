"""The report's "what changed inside" sentence: class counts with "changed", the warning for a
crosscoder whose balanced-norm latents disagree, and the activation difference's top token."""

from __future__ import annotations

import pandas as pd

from sae_transfer.report.findings import diffing_sentence

CLASSES = pd.DataFrame({"latent_class": ["shared", "changed", "chat_only", "base_only"], "n_latents": [50, 3, 2, 1]})
EMPTY = pd.DataFrame()
STATUS = pd.DataFrame(columns=["sae", "appears_on_chat", "dies_on_chat"])  # as the report's queries return them
ABLATION = pd.DataFrame(columns=["segment", "latent_set", "set_size", "kl_mean"])


def _agreement(median: float, n_disagree: int) -> pd.DataFrame:
    return pd.DataFrame({"hook": ["h"], "n_balanced": [60], "n_disagree": [n_disagree], "median_dec_cos": [median],
                         "min_dec_cos": [0.1], "agree_min_cos": [0.8], "disagree": [median < 0.8]})


def test_sentence_counts_changed_latents_and_trusts_an_agreeing_crosscoder():
    s = diffing_sentence(CLASSES, STATUS, ABLATION, _agreement(0.99, 3))
    assert "calls 2 of 56 live latents chat-only, 1 base-only, 50 shared and 3 changed" in s
    assert "under-trained" not in s


def test_sentence_flags_a_crosscoder_whose_balanced_latents_disagree():
    s = diffing_sentence(CLASSES, STATUS, ABLATION, _agreement(0.21, 45))
    assert "its decoders disagree on 45 of 60 latents with balanced norms (median cosine 0.21)" in s
    assert "not a finding" in s


def test_sentence_names_the_token_that_moves_most():
    tokens = pd.DataFrame({"token": ["<|user|>"], "mean_diff_norm": [3.0], "rel_to_typical": [12.0]})
    s = diffing_sentence(EMPTY, STATUS, ABLATION, None, tokens)
    assert s == ("What changed inside: the token whose activation moves most from base to chat is '<|user|>' "
                 "(mean ||chat - base|| 3, 12.0x the typical token).")


def test_sentence_names_no_token_when_nothing_moved():
    tokens = pd.DataFrame({"token": ["a", "b"], "mean_diff_norm": [0.0, 0.0], "rel_to_typical": [None, None]})
    assert diffing_sentence(EMPTY, STATUS, ABLATION, None, tokens) is None
    tokens = pd.DataFrame({"token": ["a"], "mean_diff_norm": [0.5], "rel_to_typical": [None]})  # typical token: 0
    assert diffing_sentence(EMPTY, STATUS, ABLATION, None, tokens).endswith("is 'a' (mean ||chat - base|| 0.5).")


def test_sentence_flags_a_crosscoder_that_misses_the_activation_difference():
    agreement = _agreement(0.98, 0).assign(diff_explained=[0.12], misses_difference=[True])
    s = diffing_sentence(CLASSES, STATUS, ABLATION, agreement)
    assert "its reconstructions reproduce only 12 % of the variance of the activation difference" in s
    assert "decoders disagree" not in s
    trusted = _agreement(0.98, 0).assign(diff_explained=[0.9], misses_difference=[False])
    assert "reproduce only" not in diffing_sentence(CLASSES, STATUS, ABLATION, trusted)


def test_crosscoder_queries_match_the_pair_by_model_name_as_the_caches_record_it(tmp_path):
    """The caches record a model by its folder name ("base"), the report asks with the spec
    ("artifacts/demo-models/base"): the crosscoder's cards and changed latents must still be found."""
    from sae_transfer.storage import catalog, tables

    cc = dict(dictionary="crosscoder-x:abc", dictionary_model="base + chat", hook="h", norm_base=1.0, norm_chat=1.0,
              rho=0.5, dec_cos=0.1, latent_class="changed", fire_count=10, frequency=0.01, chat_minus_base=[1.0, 0.0])
    tables.append_rows(tmp_path, "crosscoder_latents", [dict(cc, latent=j) for j in range(3)])
    tables.append_rows(tmp_path, "latent_examples", [dict(
        dictionary="crosscoder-x:abc", hook="h", model="paired", latent=0, rank=0, activation=1.0, seq_id=0, pos=0,
        window_start=0, token_ids=[1], tokens=["a"], acts=[1.0])])
    pair = ["artifacts/demo-models/base", "artifacts/demo-models/chat", 6]
    changed = catalog.query(tmp_path, catalog.load_query("top_changed_latents"), pair)
    cards = catalog.query(tmp_path, catalog.load_query("top_chat_latents"), pair)
    assert sorted(changed["latent"]) == [0, 1, 2] and cards["latent"].tolist() == [0]
    other = catalog.query(tmp_path, catalog.load_query("top_changed_latents"), ["other/base2", "other/chat", 6])
    assert other.empty
