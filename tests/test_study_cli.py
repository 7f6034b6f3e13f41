"""Study-level CLI: `sql` (formats, read-only, one-line errors), `report`, config validation,
and the rule that the maths imports neither Prefect nor DuckDB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sae_transfer.study import example_config, load_study, parse_study
from sae_transfer.errors import UserError
from tests import _synthetic_results as synth

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from sae_transfer.cli import main; main()"]


def _cli(*args, cwd=REPO):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    synth.fill(root)
    return root


def test_sql_formats(results):
    out = _cli("sql", "select sae_id, l0 from metrics order by sae_id limit 2", "--results", str(results), "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 2 and set(rows[0]) == {"sae_id", "l0"}
    csv = _cli("sql", "select count(*) as n from outlier_summary", "--results", str(results), "--format", "csv")
    assert csv.stdout.split() == ["n", "2"]
    table = _cli("sql", "select hook, count(*) as n from metrics group by hook", "--results", str(results))
    assert "blocks.2.hook_resid_pre" in table.stdout


def test_sql_errors_are_one_line_and_change_nothing(results):
    before = sorted(p.name for p in (results / "metrics").iterdir())
    bad = _cli("sql", "select nope from metrics", "--results", str(results))
    assert bad.returncode != 0 and bad.stderr.startswith("error: query failed:")
    assert len(bad.stderr.strip().splitlines()) == 1
    write = _cli("sql", "create table x as select 1", "--results", str(results))
    assert write.returncode != 0 and "read-only" in write.stderr.lower()
    assert sorted(p.name for p in (results / "metrics").iterdir()) == before
    missing = _cli("sql", "select 1", "--results", str(results / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_report_command_writes_html(results, tmp_path):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"name: synth\npair:\n  base: {synth.BASE}\n  chat: {synth.CHAT}\n  build_demo: false\n")
    out = _cli("report", "--results", str(results), "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert (results / "report" / "report.html").is_file()


def test_shipped_configs_validate():
    for name in ("demo", "qwen1.5-0.5b", "mistral-7b"):
        cfg = load_study(example_config(name))
        assert cfg.hooks
    assert load_study(example_config("mistral-7b")).hooks == ["blocks.16.hook_resid_pre"]


@pytest.mark.parametrize("data, message", [
    ({"sae": {"archh": "relu"}}, "unknown key 'sae.archh'"),
    ({"eval": {"tokens": 0}}, "eval.tokens"),
    ({"sae": {"arch": "gated"}}, "sae.arch"),
    ({"hooks": []}, "hooks"),
])
def test_bad_configs_fail_with_the_field(data, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_study(data)


def test_bad_config_file_cli_exit_code(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("corpus:\n  contxt_size: 12\n")
    out = _cli("run", str(cfg))
    assert out.returncode == 2
    assert "unknown key 'corpus.contxt_size'" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_maths_imports_neither_prefect_nor_duckdb():
    code = ("import sys; import sae_transfer.sae, sae_transfer.training, sae_transfer.evals.transfer, "
            "sae_transfer.evals.metrics, sae_transfer.corpus, sae_transfer.activations; "
            "bad = [m for m in ('prefect', 'duckdb') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
