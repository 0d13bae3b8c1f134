"""``bayesfuse batch``: fuse every subject of a study on Dask, resumably."""

from __future__ import annotations

import argparse
import sys

from .common import add_quiet, add_solver_options, add_to_prob_options, parse_pairs


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "batch",
        help="fuse many subjects (a CSV manifest or a study folder) on Dask, resumably",
        description="Fuse every subject of MANIFEST (a CSV manifest, or a study folder in the layout the "
        "README documents) and write DIR/<subject>/ (each subject's outputs, appearing whole or not at "
        "all) and DIR/summary.csv. A rerun skips subjects whose inputs and settings are unchanged and "
        "redoes the others; a failing subject is recorded in the summary and does not stop the rest. "
        "Runs on a local Dask cluster bound to 127.0.0.1, or on the cluster at --scheduler. "
        "Exits with 1 when a subject failed, 2 on bad input before any work.",
    )
    p.add_argument("manifest", metavar="MANIFEST", help="CSV manifest (subject, rater1, rater2, ..., image, mask, reference) or study folder")
    p.add_argument("--method", "-m", required=True, help="fusion method (see `bayesfuse models`)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/<subject>/ and DIR/summary.csv")
    p.add_argument("--force", action="store_true", help="recompute every subject, even those already done")
    p.add_argument("--interval-mass", type=float, default=0.9, metavar="M",
                   help="mass of the central credible interval written as consensus_lo/consensus_hi (default 0.9)")
    g = p.add_argument_group("Dask")
    g.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler (default: a local cluster)")
    g.add_argument("--workers", type=int, metavar="N", help="local cluster: number of worker processes (default: one per core)")
    g.add_argument("--threads-per-worker", type=int, default=1, metavar="T", help="local cluster: threads per worker (default: 1)")
    g.add_argument("--memory-limit", metavar="BYTES", help="local cluster: memory per worker, e.g. 4GiB (default: 80%% of the machine shared out)")
    g = p.add_argument_group("input")
    g.add_argument("--kind", choices=["binary", "labels", "probability"], help="declare what the raters' maps hold (inferred by default)")
    g.add_argument("--classes", type=int, metavar="K", help="number of classes K of label maps")
    g.add_argument("--invert", action="store_true", help="2-D masks drawn dark on light: read pixels < 128 as foreground")
    g.add_argument("--spacing", type=float, nargs="+", metavar="MM", help="pixel size for files without geometry (PNG, TIFF)")
    add_to_prob_options(p)
    add_solver_options(p)
    add_quiet(p)
    return p


def run(args) -> int:
    from ..batch import run_batch

    summary = run_batch(
        args.manifest, args.method, args.out,
        options=parse_pairs(args.opt, "--opt"),
        scheduler=args.scheduler, n_workers=args.workers, threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit,
        to_prob=args.to_prob, to_prob_options=parse_pairs(args.prob_opt, "--prob-opt"),
        max_iter=args.max_iter, tol=args.tol, random_seed=args.seed,
        kind=args.kind, n_classes=args.classes, invert=args.invert, spacing=args.spacing,
        interval_mass=args.interval_mass, force=args.force, command=" ".join(sys.argv),
    )
    counts = summary["status"].value_counts()
    n_failed = int(counts.get("failed", 0))
    if not args.quiet:
        parts = ", ".join(f"{int(counts[s])} {s}" for s in ("done", "skipped", "failed") if s in counts)
        print(f"{args.method}: {len(summary)} subjects ({parts}); summary in {args.out}/summary.csv")
    for sid, row in summary[summary["status"] == "failed"].iterrows():
        print(f"bayesfuse: subject {sid} failed: {row['error']}", file=sys.stderr)
    return 1 if n_failed else 0
