"""Batch fusion on Dask: subjects per minute with 1 and 2 workers, and the speed-up.

Writes N phantom subjects (:func:`bayesfuse.phantoms.make_phantom`, binary
raters, with the truth as reference) as NIfTI files with a CSV manifest, then,
measured in the same run:

- ``read pass``: one read and decode of every input file (the floor any
  batch pays: the NIfTI files are gzipped);
- ``serial``: :func:`bayesfuse.batch.fuse_subject` on every subject in this
  process, one after the other (no Dask);
- ``dask n``: :func:`bayesfuse.batch.run_batch` on a local cluster of n
  single-threaded workers (``--force``, so every subject is computed),
  timed from submission to the last summary row, after a warm-up subject
  on every worker (imports and numba compilation, paid once per worker
  process); the cluster's start-up is reported apart.

Each timing is the best of ``--repeat`` runs.

Ratios: speed-up of n workers against 1 worker, and 1 worker against the
serial loop (the overhead of Dask). To read a speed-up measured on a busy
machine, the Dask task stream gives two more figures: the mean number of
subjects in flight (sum of task times / wall time: 2 means the two workers
never idled) and the mean seconds per subject (which grows when the cores
are shared with other processes); speed-up = in flight x (seconds per
subject with 1 worker / with n workers). Run::

    /work/venv/bin/python benchmarks/batch.py                    # 8 subjects, staple, 1 and 2 workers
    /work/venv/bin/python benchmarks/batch.py --method pstaple --shape 80 80 56
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_study(root: Path, n: int, shape, n_raters: int, kind: str) -> Path:
    """N phantom subjects (distinct seeds) and their CSV manifest."""
    from bayesfuse import phantoms
    from bayesfuse.io import write_nifti

    lines = ["subject," + ",".join(f"rater{i + 1}" for i in range(n_raters)) + ",reference"]
    for s in range(n):
        ph = phantoms.make_phantom(kind, shape=shape, n_raters=n_raters, random_seed=100 + s)
        sid = f"sub{s:03d}"
        (root / sid).mkdir(parents=True)
        cells = [sid]
        for i, m in enumerate(ph.raters.maps.values):
            write_nifti(root / sid / f"rater{i + 1}.nii.gz", m, ph.raters.affine)
            cells.append(f"{sid}/rater{i + 1}.nii.gz")
        write_nifti(root / sid / "reference.nii.gz", ph.truth, ph.raters.affine)
        cells.append(f"{sid}/reference.nii.gz")
        lines.append(",".join(cells))
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def read_pass(study) -> float:
    from bayesfuse.io import read_image

    t = time.perf_counter()
    for s in study:
        for p in s.files().values():
            read_image(p)
    return time.perf_counter() - t


def _warm(warm_csv: str, method: str) -> int:
    """Fuse a tiny subject once: imports and numba compilation, paid once per process."""
    from bayesfuse import batch
    from bayesfuse.manifest import read_manifest
    from bayesfuse.models import get_model

    spec = get_model(method)
    subject = read_manifest(warm_csv).subjects[0]
    out = Path(tempfile.mkdtemp(prefix="warm-"))
    try:
        row = batch.fuse_subject(subject, out, spec, batch.Settings(method=method, config=spec.config()), force=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if row["status"] != "done":
        raise RuntimeError(f"warm-up failed: {row['error']}")
    return os.getpid()


def timed_batch(client, study, method, out):
    """run_batch with the task stream: the summary and each subject's task time."""
    from dask.distributed import get_task_stream

    from bayesfuse import batch

    with get_task_stream(client) as ts:
        df = batch.run_batch(study, method, out, client=client, force=True, progress=False)
    tasks = [sum(s["stop"] - s["start"] for s in r["startstops"] if s["action"] == "compute") for r in ts.data]
    return df, tasks


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 128, 96])
    ap.add_argument("--raters", type=int, default=5)
    ap.add_argument("--phantom", default="simple")
    ap.add_argument("--method", default="staple")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs per configuration")
    ap.add_argument("--keep", metavar="DIR", help="build the study and outputs here and keep them")
    args = ap.parse_args(argv)

    from bayesfuse import batch
    from bayesfuse.manifest import read_manifest
    from bayesfuse.models import get_model

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bayesfuse-bench-batch-"))
    try:
        t = time.perf_counter()
        csv = write_study(root / "study", args.subjects, tuple(args.shape), args.raters, args.phantom)
        warm_csv = str(write_study(root / "warm", 1, (16, 16, 16), args.raters, args.phantom))
        study = read_manifest(csv)
        size = sum(p.stat().st_size for s in study for p in s.files().values())
        print(f"machine: {platform.node()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
        print(f"study: {args.subjects} subjects x {args.raters} {args.phantom} raters, {'x'.join(map(str, args.shape))} voxels, "
              f"{size / 1e6:.1f} MB of NIfTI (written in {time.perf_counter() - t:.1f} s); method {args.method}")

        t_read, _ = best_of(args.repeat, lambda: read_pass(study))
        spec = get_model(args.method)
        settings = batch.Settings(method=args.method, config=spec.config())
        _warm(warm_csv, args.method)
        serial_out = root / "serial"
        serial_out.mkdir()
        t_serial, rows = best_of(args.repeat, lambda: [batch.fuse_subject(s, serial_out, spec, settings, force=True) for s in study])
        bad = [r for r in rows if r["status"] != "done"]
        if bad:
            raise SystemExit(f"serial run failed: {bad[0]}")

        results = {}
        for n in args.workers:
            t0 = time.perf_counter()
            with batch.open_client(n_workers=n) as client:
                t_start = time.perf_counter() - t0
                client.run(_warm, warm_csv, args.method)
                out = root / f"dask{n}"
                t_run, (df, tasks) = best_of(args.repeat, lambda: timed_batch(client, study, args.method, out))
            assert (df["status"] == "done").all(), df[df["status"] != "done"]
            results[n] = (t_start, t_run, float(df["dice"].mean()), tasks)

        n_s = args.subjects
        print(f"\n{'configuration':<22}{'seconds':>9}{'subjects/min':>14}{'in flight':>11}{'s/subject':>11}{'ratio':>28}")
        print(f"{'read pass (floor)':<22}{t_read:>9.2f}{60 * n_s / t_read:>14.1f}")
        print(f"{'serial, no Dask':<22}{t_serial:>9.2f}{60 * n_s / t_serial:>14.1f}{1:>11.2f}{t_serial / n_s:>11.2f}")
        base = results.get(1, (0, None))[1]
        for n, (t_start, t_run, dice, tasks) in results.items():
            ratio = ""
            if n == 1:
                ratio = f"{t_run / t_serial:.2f} x serial time"
            elif base:
                ratio = f"speed-up {base / t_run:.2f} vs 1 worker"
            print(f"{f'dask, {n} worker(s)':<22}{t_run:>9.2f}{60 * n_s / t_run:>14.1f}{sum(tasks) / t_run:>11.2f}{np.mean(tasks):>11.2f}{ratio:>28}")
        print("\ncluster start-up (s): " + ", ".join(f"{n} worker(s) {r[0]:.1f}" for n, r in results.items()))
        print(f"mean Dice vs truth: {np.mean([r[2] for r in results.values()]):.3f}; "
              f"per subject, serial: {t_serial / n_s:.2f} s = {t_serial / t_read:.0f} x one read pass of the inputs")
        print(f"load average at end: {os.getloadavg()[0]:.2f} (the machine is shared: numbers are noisy)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # the workers are spawned processes: they import this file too
    main()
