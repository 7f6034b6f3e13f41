"""Study-level CLI: `sql` (formats, read-only, one-line errors), `report`, config validation,
and the rule that the maths imports neither Prefect nor DuckDB."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sae_transfer.errors import UserError
from sae_transfer.study import example_config, load_study, parse_study
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


# The science (SAE maths, training, evals, corpus, the cache writer) is plain torch, tested without the engine.
# A package listed here that does not exist (yet) is skipped.
SCIENCE = ("sae_transfer.sae", "sae_transfer.training", "sae_transfer.evals", "sae_transfer.corpus", "sae_transfer.activations",
           "sae_transfer.diffing")
ENGINE = ("prefect", "duckdb")
OURS = ("sae_transfer", "storage", "tasks", "flows")


STAGE_FOLDERS = ("storage", "tasks", "flows")


def _module_file(name: str) -> Path | None:
    """The source file of one of our modules or packages, found without importing it (the stage
    folders storage/, tasks/, flows/ are installed as sae_transfer.storage, .tasks, .flows)."""
    parts = name.split(".")
    if parts[:1] == ["sae_transfer"] and parts[1:2] and parts[1] in STAGE_FOLDERS:
        parts = parts[1:]
    base = REPO.joinpath(*parts)
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _science_modules() -> list[str]:
    """Every module of the science packages, by dotted name."""
    names = []
    for package in SCIENCE:
        file = _module_file(package)
        files = sorted(file.parent.rglob("*.py")) if file and file.name == "__init__.py" else [file] if file else []
        for path in files:
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imported_names(name: str, file: Path) -> set[str]:
    """Absolute names of every module an import statement anywhere in `file` may load,
    function bodies (lazy imports) included, with each name's parent packages."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from package import module`
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def _engine_import_chains() -> list[str]:
    """Import chains from a science module to prefect or duckdb, following our own modules'
    imports (eager and lazy) transitively, e.g. 'sae_transfer.evals.x -> sae_transfer.storage.catalog -> duckdb'."""
    queue = _science_modules()
    via: dict[str, str | None] = dict.fromkeys(queue)
    chains = set()
    while queue:
        name = queue.pop()
        for dep in sorted(_imported_names(name, _module_file(name))):
            if dep.split(".")[0] in ENGINE:
                chain, at = [dep], name
                while at:
                    chain.append(at)
                    at = via[at]
                chains.add(" -> ".join(reversed(chain)))
            elif dep.split(".")[0] in OURS and dep not in via and _module_file(dep):
                via[dep] = name
                queue.append(dep)
    return sorted(chains)


def test_the_maths_never_imports_prefect_or_duckdb_even_lazily():
    assert _engine_import_chains() == []


def test_importing_every_science_module_loads_neither_prefect_nor_duckdb():
    code = ("import importlib, sys\n"
            f"for name in {_science_modules()!r}:\n    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'duckdb')); print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
