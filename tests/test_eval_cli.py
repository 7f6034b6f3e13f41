"""The evaluation commands end to end on tiny models: tables written, provenance filled,
bad pairings refused before any forward pass."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sae_transfer.cli import app
from sae_transfer.errors import UserError
from sae_transfer.sae import ReluSAE, SAEConfig
from sae_transfer.sae.io import save_sae
from sae_transfer.storage.tables import read_table
from tests._tiny import tiny_corpus_dir, tiny_model_dir
from tests.test_evals_metrics import lossless_sae

HOOK = "blocks.1.hook_resid_pre"
CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


def _save(sae, folder, model, hook=HOOK, **meta):
    return str(save_sae(sae, folder, metadata={"model_name": str(model), "hook_name": hook, "context_size": 32, **meta}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base, chat = tiny_model_dir(root, name="base", seed=0), tiny_model_dir(root, name="chat", seed=1)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(chat)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(chat)
    torch.manual_seed(0)
    noisy = ReluSAE(SAEConfig("standard", 32, 64))
    torch.nn.init.normal_(noisy.W_enc, std=0.3)
    noisy.W_dec.data = 0.5 * noisy.W_enc.data.T
    saes = {
        "lossless": _save(lossless_sae(32), root / "sae_lossless", base),
        "noisy": _save(noisy, root / "sae_noisy", chat, finetuned_from="sae_lossless"),
    }
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Add two numbers.", "Sort a list."]))
    return {"root": root, "base": str(base), "chat": str(chat), "saes": saes, "corpus": str(tiny_corpus_dir(root)),
            "prompts": str(prompts), "out": root / "results"}


def _run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
    return result


def test_evaluate_writes_full_matrix(setup):
    s = setup
    r = _run("evaluate", "--sae", s["saes"]["lossless"], "--sae", s["saes"]["noisy"], "--model", s["base"], "--model",
             s["chat"], "--hook", HOOK, "--tokens", 256, "--corpus", s["corpus"], "--out", s["out"], "--device", "cpu",
             "--bootstrap", 100)
    assert r.exit_code == 0, r.output + repr(r.exception)
    rows = read_table(s["out"], "metrics").to_pylist()
    assert len(rows) == 2 * 2 * 2  # SAEs x models x outlier policies
    assert {(x["outlier_policy"], x["segment"]) for x in rows} == {("excluded", "text"), ("included", "text")}
    for x in rows:
        assert x["n_tokens"] > 0 and x["scale_factor_eval"] > 0 and x["model_revision"].startswith("sha256:")
        # one absolute threshold for the pair, estimated on the first model and recorded as such
        assert x["outlier_threshold"] == rows[0]["outlier_threshold"] and s["base"] in x["threshold_source"]
        assert x["sae_id"].split(":")[0] in {"sae_lossless", "sae_noisy"} and x["hook"] == HOOK
        if x["sae_id"].startswith("sae_lossless"):
            # lossless up to float32 rounding of x*r/r (r = scale_ratio, not a power of two here:
            # tests/test_scaling.py::test_rescaled_lossless_sae_rounds_once); r = 1 is exact (test_families)
            assert x["ce_loss_score"] == pytest.approx(1.0, abs=1e-5) and x["mse"] == pytest.approx(0.0, abs=1e-9)
            assert x["ce_delta"] == pytest.approx(0.0, abs=1e-5)
            assert x["sae_model"] == s["base"] and x["sae_finetuned_from"] is None
        else:
            assert x["sae_finetuned_from"] == "sae_lossless" and x["ce_loss_score_lo"] <= x["ce_loss_score_hi"]
    errors = read_table(s["out"], "token_errors")
    assert errors.num_rows == sum(x["n_tokens"] for x in rows if x["outlier_policy"] == "included")


def test_outliers_and_positions(setup):
    s = setup
    r = _run("outliers", "--model", s["base"], "--hook", HOOK, "--tokens", 256, "--context-size", 32,
             "--corpus", s["corpus"], "--out", s["out"], "--device", "cpu")
    assert r.exit_code == 0, r.output + repr(r.exception)
    per_token = read_table(s["out"], "outliers").to_pandas()
    assert len(per_token) == 256 and (per_token["role"].iloc[0], per_token["pos"].iloc[0]) == ("bos", 0)
    summary = read_table(s["out"], "outlier_summary").to_pylist()
    assert [x["outlier_rule"] for x in summary] == ["absolute", "k_median"]
    assert summary[0]["excludes"] and "pair estimate" in summary[0]["threshold_source"]
    assert summary[0]["outlier_threshold"] == pytest.approx(summary[0]["suggested_threshold"])
    assert summary[0]["n_outliers"] == int(per_token["is_outlier_abs"].sum())
    r = _run("positions", "--sae", s["saes"]["noisy"], "--model", s["chat"], "--hook", HOOK, "--tokens", 256,
             "--multiples", "1,2", "--corpus", s["corpus"], "--out", s["out"], "--device", "cpu")
    assert r.exit_code == 0, r.output + repr(r.exception)
    pos = read_table(s["out"], "positions").to_pandas()
    assert set(pos["context_size"]) == {32, 64} and pos["beyond_training_context"].any()
    assert (pos[pos.bucket_lo >= 32]["context_size"] == 64).all()


def test_segments_and_rollouts(setup):
    s = setup
    args = ["segments", "--sae", s["saes"]["lossless"], "--model", s["chat"], "--hook", HOOK, "--prompts",
            s["prompts"], "--max-new-tokens", 6, "--out", s["out"], "--device", "cpu", "--corpus", s["corpus"],
            "--tokens", 256]
    for _ in range(2):
        r = _run(*args)
        assert r.exit_code == 0, r.output + repr(r.exception)
    made = read_table(s["out"], "rollouts").to_pandas()  # each run appends its rollouts: greedy, so the same ids
    assert len(made) == 4 and made["completion_ids"].map(list)[:2].tolist() == made["completion_ids"].map(list)[2:].tolist()
    seg = [x for x in read_table(s["out"], "metrics").to_pylist() if x["segment"] != "text"]
    assert {x["segment"] for x in seg} == {"user_prompt", "rollout", "template"}
    assert all(x["ce_sae"] == pytest.approx(x["ce_clean"], rel=1e-6) for x in seg)  # x*r/r rounding, as above
    assert all(x["ce_zero_segment"] == x["ce_zero_segment"] and x["ce_loss_score_segment"] == pytest.approx(1.0, abs=1e-5)
               for x in seg)
    assert all(not x["reliable"] for x in seg)  # a handful of tokens: flagged, not findings


def test_weight_diff_command(setup):
    s = setup
    r = _run("weight-diff", "--base", s["base"], "--chat", s["chat"], "--out", s["out"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    rows = read_table(s["out"], "weight_diff").to_pylist()
    assert rows and all(x["rel_diff"] > 0 for x in rows if x["kind"] != "input_layernorm" and "norm" not in x["kind"])


@pytest.mark.parametrize("case", ["d_in", "sae_hook", "layer"])
def test_bad_pairings_fail_before_any_forward(setup, monkeypatch, case):
    from sae_transfer.evals import splice

    def no_forward(*a, **k):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(splice, "hook_activations", no_forward)
    monkeypatch.setattr(splice, "clean_pass", no_forward)
    s, root = setup, setup["root"]
    sae, hook, match = s["saes"]["noisy"], HOOK, ""
    if case == "d_in":
        sae, match = _save(ReluSAE(SAEConfig("standard", 16, 8)), root / "narrow", s["base"]), "d_in=16"
    elif case == "sae_hook":
        sae, match = _save(lossless_sae(32), root / "other_hook", s["base"], hook="blocks.0.hook_resid_pre"), "trained on hook"
    else:
        sae, hook, match = (_save(lossless_sae(32), root / "deep", s["base"], hook="blocks.7.hook_resid_pre"),
                            "blocks.7.hook_resid_pre", "layers")
    r = _run("evaluate", "--sae", sae, "--model", s["base"], "--hook", hook, "--tokens", 64, "--out", s["out"], "--device", "cpu")
    assert isinstance(r.exception, UserError), r.output
    assert match in str(r.exception)
