"""Study-level commands: demo, run, watch, report, sql."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import typer

from sae_transfer.cli._common import print_table
from sae_transfer.errors import UserError

RESULTS_HELP = ("study results folder or object-store prefix, e.g. s3://bucket/results/demo "
                "(default: results/<study name> of --config, else results/demo)")


def _config(config: Path | None):
    from sae_transfer.study import example_config, load_study

    return load_study(config or example_config("demo"))


def _results(results: str | None, config: Path | None):
    """The results root: a Path, or a RemotePath for a URL (credentials from the AWS variables)."""
    from sae_transfer.storage.store import location, probe

    folder = location(results) if results else _config(config).results_dir
    if not probe(folder):
        raise UserError(f"results folder {str(folder)!r} does not exist: run `sae-transfer demo` or pass --results")
    return folder


def _pair_from_results(results, config: Path | None) -> tuple[str, str]:
    """Base and chat ids: from --config, else the latest recorded run, else the demo config."""
    if config is None:
        from sae_transfer.storage import catalog

        runs = catalog.query(results, "select config_json from runs where config_json is not null "
                             "order by created_at desc limit 1")
        if len(runs):
            pair = json.loads(runs["config_json"][0])["pair"]
            return pair["base"], pair["chat"]
    cfg = _config(config)
    return cfg.pair.base, cfg.pair.chat


@contextmanager
def _readable_tables(folder):
    """Turn DuckDB's error on a damaged result file (a truncated part-*.parquet) into one line."""
    import duckdb

    try:
        yield
    except duckdb.Error as exc:
        raise UserError(f"results in {str(folder)!r} are unreadable ({' '.join(str(exc).split())}): delete the damaged "
                        "file and re-run the step that wrote it") from None


RUNNER_HELP = ("where the heavy steps run, overriding the config's runner: processes (this machine's worker "
               "processes), dask (a Dask LocalCluster here) or a Dask scheduler address such as tcp://host:8786")
WORKERS_HELP = "worker processes, or LocalCluster workers (overrides runner.workers)"


def _with_runner(cfg, runner: str | None, workers: int | None):
    """`cfg` with its runner section overridden by the --runner / --workers options."""
    update: dict = {} if workers is None else {"workers": workers}
    if runner in ("processes", "dask"):
        update.update(kind=runner, address=None)
    elif runner is not None and (runner.startswith(("tcp://", "tls://", "ucx://")) or runner.rpartition(":")[2].isdigit()):
        update.update(kind="dask", address=runner)
    elif runner is not None:
        raise UserError(f"--runner {runner!r}: use processes, dask, or a Dask scheduler address such as tcp://host:8786")
    return cfg.model_copy(update={"runner": cfg.runner.model_copy(update=update)}) if update else cfg


def register(app: typer.Typer) -> None:
    """Add the study commands to `app`."""

    @app.command()
    def demo(
        results_root: str = typer.Option("results", help="parent folder of study results, or s3://bucket/prefix"),
    ) -> None:
        """Run the whole transfer study on the offline demo pair and print where the report is."""
        from sae_transfer.flows.study import run_study
        from sae_transfer.study import example_config, load_study

        cfg = load_study(example_config("demo")).model_copy(update={"results_root": str(results_root)})
        summary = run_study(cfg)
        typer.echo(summary)

    @app.command()
    def run(
        config: Path = typer.Argument(..., help="study config (.yaml or .toml); examples in sae_transfer/configs/"),
        runner: str | None = typer.Option(None, help=RUNNER_HELP),
        workers: int | None = typer.Option(None, min=1, help=WORKERS_HELP),
    ) -> None:
        """Run the transfer study described by CONFIG (cached steps are skipped)."""
        from sae_transfer.flows.study import run_study
        from sae_transfer.study import load_study

        typer.echo(run_study(_with_runner(load_study(config), runner, workers)))

    @app.command()
    def watch(
        config: Path | None = typer.Option(None, help="study config (default: the demo study)"),
        checkpoints: str | None = typer.Option(
            None, help="folder or s3:// prefix of checkpoints (default: the config's pair.checkpoints)"),
        runner: str | None = typer.Option(None, help=RUNNER_HELP),
        workers: int | None = typer.Option(None, min=1, help=WORKERS_HELP),
    ) -> None:
        """Evaluate every checkpoint not seen before (once each, several at once), then rebuild the report."""
        from sae_transfer.flows._runs import flow_options, shared_api
        from sae_transfer.flows.watch import watch_checkpoints

        cfg = _with_runner(_config(config), runner, workers)
        if checkpoints is not None:
            cfg = cfg.model_copy(update={"pair": cfg.pair.model_copy(update={"checkpoints": checkpoints})})
        with shared_api():
            result = watch_checkpoints.with_options(**flow_options(cfg))(cfg)
        typer.echo(json.dumps(result, indent=2))

    @app.command()
    def report(
        results: str | None = typer.Option(None, help=RESULTS_HELP),
        config: Path | None = typer.Option(None, help="study config naming the pair (default: the latest run's)"),
    ) -> None:
        """Build the HTML + Markdown base-vs-chat report from the DuckDB catalog."""
        from sae_transfer.report.build import build_report

        folder = _results(results, config)
        with _readable_tables(folder):
            base, chat = _pair_from_results(folder, config)
            paths = build_report(folder, base, chat)
        typer.echo(f"report: {paths.html}\nmarkdown: {paths.markdown}")

    @app.command()
    def sql(
        query: str = typer.Argument(..., help="SQL over the views metrics, outliers, outlier_summary, token_errors, "
                                    "training_log, weight_diff, positions, rollouts, checkpoints, runs, latent_stats, "
                                    "latent_matches, latent_drift, crosscoder_latents, latent_scaling, latent_examples, "
                                    "latent_histograms, latent_ablation (the current result per key; every "
                                    "appended row is in <view>_history, e.g. metrics_history)"),
        results: str | None = typer.Option(None, help=RESULTS_HELP),
        format: str = typer.Option("table", "--format", "-f", help="table, csv or json"),
        limit: int = typer.Option(200, min=0, help="rows shown in table format"),
    ) -> None:
        """Answer ad-hoc SQL over a study's results (read-only)."""
        import duckdb

        from sae_transfer.storage import catalog

        if format not in {"table", "csv", "json"}:
            raise UserError(f"unknown --format {format!r}: use table, csv or json")
        folder = _results(results, None)
        with _readable_tables(folder):
            con = catalog.connect(folder)
        try:
            df = con.execute(query).df()
        except duckdb.Error as exc:
            raise UserError(f"query failed: {' '.join(str(exc).split())}") from None
        finally:
            con.close()
        if format == "csv":
            df.to_csv(sys.stdout, index=False)
        elif format == "json":
            typer.echo(df.to_json(orient="records", date_format="iso"))
        else:
            print_table([str(c) for c in df.columns], df.head(limit).itertuples(index=False), total=len(df), digits=6)
