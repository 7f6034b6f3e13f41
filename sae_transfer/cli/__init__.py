"""The `sae-transfer` command line. Each command group lives in its own module here and
registers itself on the shared typer app; `main` turns UserError into one line + exit 2.

Commands import the science, torch, transformers, Prefect, DuckDB and pandas inside their
functions, so `sae-transfer --help` and usage errors answer without loading them."""

from __future__ import annotations

import logging
import os
import sys

import typer

# Fresh Prefect databases migrate for 25-35 s on small machines; the 20 s default times out.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from sae_transfer.errors import UserError

app = typer.Typer(
    help="Do sparse autoencoders transfer between base and chat models? Cache activations, "
    "train SAEs, evaluate transfer, and report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from sae_transfer.cli import cache_cmd, crosscoder_cmd, diff_cmd, eval_cmd, models_cmd, plan_cmd, study_cmd, train_cmd  # noqa: E402

for _module in (models_cmd, cache_cmd, train_cmd, eval_cmd, study_cmd, plan_cmd, diff_cmd, crosscoder_cmd):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=os.environ.get("SAE_TRANSFER_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:  # a bad, missing or mistyped option (typer's own click): one line
        if not hasattr(exc, "format_message"):
            raise
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "sae-transfer"
        message = " ".join(exc.format_message().split())
        if message:  # empty when the help was just printed (no arguments)
            print(f"error: {message} (see `{command} --help`)", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
