"""`sae-transfer plan CONFIG`: what a study will cost (tokens, disk, memory, FLOPs, time) before
it runs, read from the models' configurations only."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sae_transfer.cli._common import print_table
from sae_transfer.errors import UserError

COLUMNS = ("step", "for", "tokens", "model tokens", "disk", "device mem", "host mem", "FLOPs", "time here", "time on GPU",
           "cached")


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("plan")(plan)


def plan(
    config: Path = typer.Argument(..., help="study config (.yaml or .toml); examples in sae_transfer/configs/"),
    gpu: str | None = typer.Option(None, "--gpu", help="also estimate time on this GPU: h100, a100 or h200"),
    format: str = typer.Option("table", "--format", "-f", help="table or json"),
    device: str | None = typer.Option(None, "--device", help="device to time here (default: the config's, else CUDA, else CPU)"),
) -> None:
    """Per step of the study: tokens, disk, peak memory, FLOPs and estimated time; nothing is downloaded but configs."""
    if format not in {"table", "json"}:
        raise UserError(f"unknown --format {format!r}: use table or json")
    from sae_transfer.plan import plan_study
    from sae_transfer.study import load_study

    cfg = load_study(config)
    result = plan_study(cfg, gpu=gpu, device=device, config_name=str(config))
    if format == "json":
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    print_plan(result, cfg.results_dir)


def print_plan(result, results_dir: Path) -> None:
    """The plan as a table, its totals, and a warning when its writes would not fit the disk."""
    from sae_transfer.plan import free_bytes, human_bytes, human_count, human_seconds

    for role, s in result.shapes.items():
        typer.echo(f"{role}: {s.name}: {human_count(s.n_params)} params, d_model {s.d_model}, {s.n_layers} layers, "
                   f"vocab {s.vocab}")
    rows = [(s.step, s.target, human_count(s.tokens), human_count(s.model_tokens), human_bytes(s.disk_bytes),
             human_bytes(s.device_bytes), human_bytes(s.host_bytes), human_count(s.flops), human_seconds(s.seconds),
             human_seconds(s.gpu_seconds), {True: "yes", False: "no", None: ""}[s.cached]) for s in result.steps]
    print_table(COLUMNS, rows)
    t = result.totals()
    gpu = f", {human_seconds(t['total_gpu_seconds'])} on {result.gpu}" if result.gpu else ""
    typer.echo(f"total: disk {human_bytes(t['total_disk_bytes'])} (activation caches {human_bytes(t['cache_disk_bytes'])}), "
               f"peak device memory {human_bytes(t['peak_device_bytes'])}, {human_count(t['total_flops'])}FLOP, "
               f"time {human_seconds(t['total_seconds'])} on {result.device}{gpu} (steps not cached)")
    typer.echo(f"assumed: {result.assumptions['utilisation']:.0%} of a GPU's published dense rate; "
               f"here: {result.assumptions['device_rate']}")
    free = free_bytes(results_dir)
    if t["total_disk_bytes_to_write"] > free:
        typer.echo(f"warning: the study writes {human_bytes(t['total_disk_bytes_to_write'])} but {results_dir} has "
                   f"{human_bytes(free)} free: lower corpus.train_tokens or set results_root to a bigger disk")
