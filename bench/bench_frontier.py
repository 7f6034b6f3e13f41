"""Sparsity–fidelity frontier of our SAE trainer, optionally beside SAELens's, on one activation cache.

Trains ReLU SAEs at several L1 coefficients and TopK SAEs at several k (16× expansion, batch
4096, lr 4e-4, 5 % L1 warm-up, 20 % linear LR decay, the study's recipe) on the first rows of a
cached activation dataset, and measures L0 and explained variance on its last `--eval-tokens`
rows, which no SAE trains on (the cache is in sequence order, so they are whole held-out
sequences). Both trainers get the same scaled rows: the bench scales them once to mean norm
√d_model (sae_transfer.sae.scaling) and trains with normalize_activations off.

With `--saelens-python PYTHON` (an interpreter of a separate environment with `pip install
sae-lens`; never the project's: SAELens pins transformer-lens < 4), the same SAEs are trained
with SAELens's own SAETrainer through bench/saelens_frontier_driver.py, and the bench prints
both frontiers and each of our points against SAELens's frontier at the same L0 (linear
interpolation between the two SAELens points that bracket it; none outside their L0 range).

    python bench/bench_frontier.py --tokens 300000                      # ours only, quick
    python bench/bench_frontier.py --saelens-python /path/to/venv/bin/python --json frontier.json
    python bench/bench_frontier.py --archs relu --l1 5 --set init_b_dec=zeros   # a TrainConfig override

`--work DIR` keeps the exported rows and every trained SAE; a re-run with the same settings
reuses them (our runs resume or skip by their run.json; SAELens runs by their output file).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_transfer.sae import metrics
from sae_transfer.sae.scaling import scale_factor_of

DEMO_ACTS = "results/demo/activations/base__blocks.2.hook_resid_pre__train-600k__59552184509d08fb"
DRIVER = Path(__file__).with_name("saelens_frontier_driver.py")


@dataclass(frozen=True)
class Point:
    """One trained SAE measured on the held-out rows."""

    trainer: str  # "ours" or "saelens"
    arch: str  # relu | topk
    param: float  # L1 coefficient (relu) or k (topk)
    l0: float  # mean active latents per held-out row
    ev: float  # explained variance (DESIGN.md definition) over all held-out rows
    mse: float  # mean Σ_d (x − x̂)² per row, scaled units
    train_s: float  # training wall time, seconds


def export_rows(acts: Path, eval_tokens: int, work: Path) -> tuple[Path, Path]:
    """Write work/train.safetensors and work/eval.safetensors (`acts`, scaled to mean norm √d on
    the training rows) from the dataset folder; reuse them if present. Returns both paths."""
    train_path, eval_path = work / "train.safetensors", work / "eval.safetensors"
    if train_path.is_file() and eval_path.is_file():
        return train_path, eval_path
    from sae_transfer.storage.activations import ActivationDataset

    ds = ActivationDataset(acts)
    raw_ND = ds.acts(ds.read_table(columns=["act"])).float()
    if raw_ND.shape[0] <= eval_tokens + 4096:
        raise SystemExit(f"--acts {acts}: {raw_ND.shape[0]} rows leave too few for training after --eval-tokens {eval_tokens}")
    train_ND, eval_ND = raw_ND[:-eval_tokens], raw_ND[-eval_tokens:]
    s = scale_factor_of(train_ND.norm(dim=-1), train_ND.shape[1])
    save_file({"acts": (train_ND * s).contiguous()}, str(train_path))
    save_file({"acts": (eval_ND * s).contiguous()}, str(eval_path))
    return train_path, eval_path


def measure(x_ND: torch.Tensor, x_hat_ND: torch.Tensor, l0_N: torch.Tensor) -> tuple[float, float, float]:
    """(L0, explained variance, mse) over all rows, with the project's metric definitions."""
    return float(l0_N.float().mean()), float(metrics.explained_variance(x_ND, x_hat_ND)), float(metrics.mse(x_ND, x_hat_ND))


@torch.no_grad()
def reconstruct_ours(sae_dir: Path, x_ND: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂ [N, D], active latents per row [N]) of a saved SAE (its inference forward)."""
    from sae_transfer.sae.io import load_sae

    sae = load_sae(sae_dir)
    outs, l0s = [], []
    for i in range(0, x_ND.shape[0], chunk):
        feats_BF = sae.encode(x_ND[i : i + chunk])
        outs.append(sae.decode(feats_BF))
        l0s.append((feats_BF != 0).sum(-1).float())
    return torch.cat(outs), torch.cat(l0s)


def train_ours(args, arch: str, param: float, train_path: Path, eval_ND: torch.Tensor) -> Point:
    """Train (or reuse) one of our SAEs and measure it."""
    from sae_transfer.training.api import train_on_dataset
    from sae_transfer.training.config import TrainConfig

    sparsity = {"l1_coefficient": param} if arch == "relu" else {"k": int(param)}
    out = args.work / "ours" / f"{arch}-{param:g}"
    cfg = TrainConfig(
        arch=arch, total_tokens=args.tokens, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        l1_warmup_frac=args.l1_warmup_frac, lr_decay_frac=args.lr_decay_frac, normalize_activations=False,
        num_threads=args.threads, device=args.device, checkpoint_every_tokens=0, **sparsity, **args.overrides,
    )
    result = train_on_dataset(train_path, out, cfg, expansion=args.expansion)
    train_s = json.loads(result.run_json.read_text())["timings"]["train_s"]
    return Point("ours", arch, param, *measure(eval_ND, *reconstruct_ours(result.sae_dir, eval_ND)), train_s)


def train_saelens(args, arch: str, param: float, train_path: Path, eval_path: Path, eval_ND: torch.Tensor) -> Point:
    """Train (or reuse) one SAELens SAE in the other environment and measure it."""
    out = args.work / "saelens" / f"{arch}-{param:g}-{args.tokens}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file():
        cmd = [
            args.saelens_python, str(DRIVER), "--train", str(train_path), "--eval", str(eval_path), "--out", str(out),
            "--arch", arch, "--l1" if arch == "relu" else "--k", f"{param:g}", "--expansion", str(args.expansion),
            "--tokens", str(args.tokens), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--l1-warmup-frac", str(args.l1_warmup_frac), "--lr-decay-frac", str(args.lr_decay_frac),
            "--seed", str(args.seed), "--threads", str(args.threads), "--device", args.device,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"SAELens driver failed ({done.returncode}):\n{done.stderr[-3000:]}")
    got = load_file(str(out))
    train_s = json.loads(out.with_suffix(".json").read_text())["train_s"]
    return Point("saelens", arch, param, *measure(eval_ND, got["x_hat"], got["l0"]), train_s)


def ev_at(frontier: list[Point], l0: float) -> float | None:
    """EV of `frontier` at `l0` by linear interpolation between the two points whose L0 bracket
    it; None when `l0` lies outside the frontier's L0 range (no extrapolation)."""
    pts = sorted(frontier, key=lambda p: p.l0)
    if not pts or not pts[0].l0 <= l0 <= pts[-1].l0:
        return None
    for a, b in zip(pts, pts[1:] or pts):
        if a.l0 <= l0 <= b.l0:
            return a.ev if b.l0 == a.l0 else a.ev + (l0 - a.l0) / (b.l0 - a.l0) * (b.ev - a.ev)
    return pts[0].ev


def report(points: list[Point]) -> list[dict]:
    """Print one table per architecture; returns the matched-L0 rows."""
    matched = []
    for arch in sorted({p.arch for p in points}):
        ours = [p for p in points if p.arch == arch and p.trainer == "ours"]
        theirs = [p for p in points if p.arch == arch and p.trainer == "saelens"]
        name = "L1 coeff" if arch == "relu" else "k"
        print(f"\n{arch}: {name:>8} | ours L0 / EV / mse    (train s) | SAELens L0 / EV / mse (train s) | "
              "SAELens EV at our L0 | Δ EV")
        for p in sorted(ours, key=lambda p: p.param):
            q = next((t for t in theirs if t.param == p.param), None)
            at = ev_at(theirs, p.l0)
            right = f"{q.l0:7.1f} / {q.ev:.4f} / {q.mse:6.2f} ({q.train_s:5.0f})" if q else " " * 33
            cmp = f"{at:.4f} | {p.ev - at:+.4f}" if at is not None else ("outside its L0 range" if theirs else "")
            print(f"{'':6}{p.param:>8g} | {p.l0:7.1f} / {p.ev:.4f} / {p.mse:6.2f} ({p.train_s:5.0f}) | {right} | {cmp}")
            if at is not None:
                matched.append({"arch": arch, "param": p.param, "l0": p.l0, "ours_ev": p.ev, "saelens_ev_at_l0": at,
                                "delta_ev": p.ev - at})
    return matched


def plot(points: list[Point], path: Path, tokens: int) -> None:
    """Both frontiers, EV against L0, one panel per architecture, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({p.arch for p in points})
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for trainer, style in (("ours", "o-"), ("saelens", "s--")):
            pts = sorted((p for p in points if p.arch == arch and p.trainer == trainer), key=lambda p: p.l0)
            if pts:
                ax.plot([p.l0 for p in pts], [p.ev for p in pts], style, label="sae-transfer" if trainer == "ours" else "SAELens")
        ax.set(title=f"{arch}, {tokens / 1e6:g}M tokens", xlabel="L0 (held-out)", ylabel="explained variance")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", type=Path, default=Path(DEMO_ACTS), help="cached activation dataset folder")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="held-out rows taken from the end of the cache")
    p.add_argument("--tokens", type=int, default=1_200_000, help="training tokens per SAE (reference figures: 1.2M)")
    p.add_argument("--archs", default="relu,topk")
    p.add_argument("--l1", default="2,5,12", help="ReLU L1 coefficients")
    p.add_argument("--ks", default="16,32,64", help="TopK k values")
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--l1-warmup-frac", type=float, default=0.05)
    p.add_argument("--lr-decay-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every trainer")
    p.add_argument("--device", default="cpu", help="where both trainers run (cpu, cuda, ...)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="extra TrainConfig field for our runs")
    p.add_argument("--saelens-python", default=None, help="python of an environment with sae-lens installed")
    p.add_argument("--skip-ours", action="store_true", help="train only the SAELens side")
    p.add_argument("--work", type=Path, default=None, help="keep exported rows and SAEs here (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write every point and the matched-L0 rows here")
    p.add_argument("--plot", type=Path, default=None, help="write both frontiers as a PNG here")
    args = p.parse_args()
    args.overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    torch.set_num_threads(args.threads)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-frontier-")
    args.work = (args.work or Path(tmp.name)).resolve()
    args.work.mkdir(parents=True, exist_ok=True)

    train_path, eval_path = export_rows(args.acts, args.eval_tokens, args.work)
    eval_ND = load_file(str(eval_path))["acts"]
    print(f"{args.acts}: training rows in {train_path}, {eval_ND.shape[0]} held-out rows; {args.tokens} tokens per SAE; "
          f"torch threads {torch.get_num_threads()}; overrides {args.overrides or 'none'}", flush=True)
    runs = [(a, float(v)) for a in args.archs.split(",") for v in (args.l1 if a == "relu" else args.ks).split(",")]
    points: list[Point] = []
    t0 = time.perf_counter()
    for arch, param in runs:
        if not args.skip_ours:
            points.append(train_ours(args, arch, param, train_path, eval_ND))
            print(f"  ours    {arch} {param:g}: L0 {points[-1].l0:.1f} EV {points[-1].ev:.4f}", flush=True)
        if args.saelens_python:
            points.append(train_saelens(args, arch, param, train_path, eval_path, eval_ND))
            print(f"  saelens {arch} {param:g}: L0 {points[-1].l0:.1f} EV {points[-1].ev:.4f}", flush=True)
    matched = report(points)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "points": [p.__dict__ for p in points], "matched": matched}, indent=1))
    if args.plot:
        plot(points, args.plot, args.tokens)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
