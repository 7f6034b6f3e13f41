"""Bad values and damaged files end in one line naming the option or file and the fix, exit 2,
never a traceback: sizes that are zero or negative, wrong types, truncated weights, corrupt
tables, empty inputs. Each case fails before any model is loaded or any SAE trained."""

from __future__ import annotations

import shutil
import sys

import pytest

from sae_transfer.cli import main
from sae_transfer.cli._common import parse_count, parse_int_list
from sae_transfer.errors import UserError
from sae_transfer.sae.io import save_sae
from tests._tiny import write_synthetic_dataset
from tests.test_evals_metrics import lossless_sae

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small activation dataset, an SAE, a truncated copy of it, a damaged model folder, a bad
    prompts file and a results folder with a corrupt table part."""
    root = tmp_path_factory.mktemp("cli-errors")
    acts = write_synthetic_dataset(root / "acts", 512, d_model=16)
    sae = save_sae(lossless_sae(16), root / "sae", metadata={"model_name": "m", "hook_name": HOOK, "context_size": 32})
    trunc = root / "sae-truncated"
    shutil.copytree(sae, trunc)
    weights = trunc / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    model = root / "model-truncated"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2, '
                                       '"num_attention_heads": 4, "intermediate_size": 32, "vocab_size": 64}')
    bad_config = root / "model-bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"model_type": "llama", "hidden_size": 16, "num_attention_heads": 3}')
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    (root / "empty").mkdir()
    (root / "bad.jsonl").write_text('{"prompt": "sort a list"}\n{not json\n')
    (root / "results" / "metrics").mkdir(parents=True)
    (root / "results" / "metrics" / "part-0.parquet").write_bytes(b"PAR1 truncated")
    return {"root": root, "acts": acts, "sae": sae, "trunc": trunc, "model": model, "bad_config": bad_config,
            "empty": root / "empty", "prompts": root / "bad.jsonl", "results": root / "results"}


def _train(f, *extra):
    return ["train", "--acts", f["acts"], "--d-sae", "8", "--tokens", "1024", "--batch-size", "128",
            "--out", f["root"] / "run", *extra]


def _eval(f, command="evaluate", *extra, sae=None):
    return [command, "--sae", sae or f["sae"], "--model", f["model"], "--hook", HOOK, "--out", f["root"] / "res", *extra]


CASES = {
    # the two named in the issue
    "train --d-sae -5": (lambda f: _train(f)[:4] + ["-5"] + _train(f)[5:], "--d-sae"),
    "evaluate a truncated SAE": (lambda f: _eval(f, sae=f["trunc"]), "sae_weights.safetensors is damaged"),
    # zero or negative sizes
    "train --d-sae 0": (lambda f: _train(f)[:4] + ["0"] + _train(f)[5:], "--d-sae"),
    "train --tokens -1k": (lambda f: _train(f)[:6] + ["-1k"] + _train(f)[7:], "--tokens '-1k'"),
    "train --tokens inf": (lambda f: _train(f)[:6] + ["inf"] + _train(f)[7:], "--tokens 'inf'"),
    "train --batch-size 0": (lambda f: _train(f)[:8] + ["0"] + _train(f)[9:], "--batch-size"),
    "train --k 0": (lambda f: _train(f, "--arch", "topk", "--k", "0"), "--k"),
    "train --k above --d-sae": (lambda f: _train(f, "--arch", "topk", "--k", "20"), "--k 20"),
    "train --lr -1": (lambda f: _train(f, "--lr", "-1"), "--lr"),
    "train --l1 -1": (lambda f: _train(f, "--l1", "-1"), "--l1"),
    "train --log-every 0": (lambda f: _train(f, "--log-every", "0"), "--log-every"),
    "train --threads -1": (lambda f: _train(f, "--threads", "-1"), "--threads"),
    "train --buffer-tokens 0": (lambda f: _train(f, "--buffer-tokens", "0"), "--buffer-tokens"),
    "train --lr-warmup 2": (lambda f: _train(f, "--lr-warmup", "2"), "--lr-warmup"),
    "finetune --tokens 0": (lambda f: ["finetune", "--sae", f["sae"], "--acts", f["acts"], "--out", f["root"] / "ft",
                                       "--tokens", "0"], "--tokens '0'"),
    "evaluate --tokens 0": (lambda f: _eval(f, "evaluate", "--tokens", "0"), "--tokens"),
    "evaluate --bootstrap -1": (lambda f: _eval(f, "evaluate", "--bootstrap", "-1"), "--bootstrap"),
    "evaluate --context-size 1": (lambda f: _eval(f, "evaluate", "--context-size", "1"), "--context-size"),
    "evaluate --batch-tokens 0": (lambda f: _eval(f, "evaluate", "--batch-tokens", "0"), "--batch-tokens"),
    "evaluate --k-median -1": (lambda f: _eval(f, "evaluate", "--k-median", "-1"), "--k-median"),
    "evaluate --mad-k 0": (lambda f: _eval(f, "evaluate", "--mad-k", "0"), "--mad-k"),
    "outliers --context-size 0": (lambda f: ["outliers", "--model", f["model"], "--hook", HOOK, "--out", f["root"] / "o",
                                             "--context-size", "0"], "--context-size"),
    "segments --max-prompts 0": (lambda f: _eval(f, "segments", "--max-prompts", "0"), "--max-prompts"),
    "segments --max-new-tokens 0": (lambda f: _eval(f, "segments", "--max-new-tokens", "0"), "--max-new-tokens"),
    "positions --multiples 0": (lambda f: _eval(f, "positions", "--multiples", "0"), "--multiples"),
    "positions --max-positions 0": (lambda f: _eval(f, "positions", "--max-positions", "0"), "--max-positions"),
    "cache --tokens 0": (lambda f: ["cache", "--model", f["model"], "--hook", HOOK, "--tokens", "0", "--out", f["root"] / "c"],
                         "--tokens '0'"),
    "cache --shard-size 0": (lambda f: ["cache", "--model", f["model"], "--hook", HOOK, "--tokens", "64", "--shard-size", "0",
                                        "--out", f["root"] / "c"], "--shard-size"),
    "cache --row-group-rows 0": (lambda f: ["cache", "--model", f["model"], "--hook", HOOK, "--tokens", "64",
                                            "--row-group-rows", "0", "--out", f["root"] / "c"], "--row-group-rows"),
    "sql --limit -1": (lambda f: ["sql", "select 1", "--results", f["empty"], "--limit", "-1"], "--limit"),
    "demo-models --threads 0": (lambda f: ["demo-models", "--out", f["root"] / "dm", "--threads", "0"], "--threads"),
    # wrong types and devices
    "train --d-sae abc": (lambda f: _train(f)[:4] + ["abc"] + _train(f)[5:], "--d-sae"),
    "positions --multiples a,b": (lambda f: _eval(f, "positions", "--multiples", "a,b"), "--multiples"),
    "hooks --device tpu": (lambda f: ["hooks", "--model", f["model"], "--device", "tpu"], "device 'tpu'"),
    # truncated, corrupt or empty inputs
    "finetune from a truncated SAE": (lambda f: ["finetune", "--sae", f["trunc"], "--acts", f["acts"], "--out",
                                                 f["root"] / "ft"], "sae_weights.safetensors is damaged"),
    "hooks on a truncated model": (lambda f: ["hooks", "--model", f["model"], "--device", "cpu"], "could not load model"),
    "hooks on a model whose config is invalid": (lambda f: ["hooks", "--model", f["bad_config"], "--device", "cpu"],
                                                 "could not load model"),
    "weight-diff on a truncated model": (lambda f: ["weight-diff", "--base", f["model"], "--chat", f["model"], "--out",
                                                    f["root"] / "w"], "model.safetensors is damaged"),
    "train on an empty folder": (lambda f: ["train", "--acts", f["empty"], "--d-sae", "8", "--tokens", "1k", "--out",
                                            f["root"] / "run2"], "empty"),
    "evaluate an empty SAE folder": (lambda f: _eval(f, sae=f["empty"]), "is not an SAE folder"),
    "segments with a broken prompts file": (lambda f: ["segments", "--sae", f["sae"], "--model", f["model"], "--hook", HOOK,
                                                       "--out", f["root"] / "s", "--prompts", f["prompts"]], "bad.jsonl"),
    "sql over a corrupt table": (lambda f: ["sql", "select count(*) from metrics", "--results", f["results"]], "part-0.parquet"),
    "report over a corrupt table": (lambda f: ["report", "--results", f["results"]], "part-0.parquet"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, files, monkeypatch, capsys):
    build, names = CASES[case]
    monkeypatch.setattr(sys, "argv", ["sae-transfer", *map(str, build(files))])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and names in last, err
    assert "Traceback" not in err


@pytest.mark.parametrize("text,want", [("4096", 4096), ("5M", 5_000_000), ("800k", 800_000), ("1e6", 1_000_000),
                                       ("128MiB", 128 << 20), ("2_000", 2000), ("1.5k", 1500), ("1b", 10**9)])
def test_one_size_parser_reads_counts_and_bytes(text, want):
    assert parse_count(text, "--x") == want


@pytest.mark.parametrize("text", ["0", "-3", "nan", "inf", "1e999", "five", "", "k"])
def test_size_parser_refuses_what_is_not_a_positive_count(text):
    with pytest.raises(UserError, match="--x"):
        parse_count(text, "--x")
    assert parse_count("0", "--x", minimum=0) == 0


def test_int_list_parser():
    assert parse_int_list("1, 2,4", "--m") == (1, 2, 4)
    for bad in ("", "0", "1,x", "-1"):
        with pytest.raises(UserError, match="--m"):
            parse_int_list(bad, "--m")
