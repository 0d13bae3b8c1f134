"""``bayesfuse fuse``: fuse rater files (or a phantom) into a consensus."""

from __future__ import annotations

import argparse
import sys
import time

from .common import (
    add_input_options, add_quiet, add_solver_options, add_to_prob_options,
    check_out_dir, parse_pairs,
)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "fuse",
        help="fuse raters' maps into a consensus",
        description="Fuse raters' maps and write DIR/consensus.nii.gz, DIR/labels.nii.gz, "
        "DIR/raters.csv and DIR/result.nc (plus any maps the method makes: sd, tau, components).",
    )
    p.add_argument("raters", nargs="*", metavar="RATER_FILE", help="one file per rater, or one 4-D file (raters on the last axis)")
    p.add_argument("--method", "-m", required=True, help="fusion method (see `bayesfuse models`)")
    p.add_argument("--phantom", metavar="KIND", help="fuse a built-in synthetic case instead of files (see bayesfuse.phantoms)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--report", action="store_true", help="also write DIR/report.html")
    p.add_argument("--interval-mass", type=float, default=0.9, metavar="M",
                   help="mass of the central credible interval written as consensus_lo/consensus_hi (default 0.9)")
    add_input_options(p)
    add_to_prob_options(p)
    add_solver_options(p)
    add_quiet(p)
    return p


def load_input(args):
    """The raters of a command: files, or a phantom (``--phantom KIND``)."""
    from .. import api

    if args.phantom:
        if args.raters:
            raise SystemExit("bayesfuse: error: give rater files or --phantom, not both")
        from .. import phantoms

        return phantoms.make_phantom(args.phantom, random_seed=0 if args.seed is None else args.seed).raters
    if not args.raters:
        from ..errors import InputError

        raise InputError("raters", "no rater files given (or use --phantom KIND)")
    return api.as_rater_maps(
        args.raters, image=args.image, mask=args.mask, kind=args.kind, n_classes=args.classes,
        invert=args.invert, spacing=args.spacing,
    )


def run(args) -> int:
    from .. import api
    from ..models import get_model
    from ..result import CORE_OUTPUTS

    spec = get_model(args.method)
    options = parse_pairs(args.opt, "--opt")
    config = spec.config(**options)
    from ..summaries import attach, check_mass

    check_mass(args.interval_mass)
    check_out_dir(args.out, list(CORE_OUTPUTS) + (["report.html"] if args.report else []), args.force)
    t0 = time.perf_counter()
    data = load_input(args)
    data = api.convert(data, args.to_prob, **parse_pairs(args.prob_opt, "--prob-opt"))
    kwargs = {"random_seed": args.seed, "method": args.method}
    if args.max_iter is not None:
        kwargs["max_iter"] = args.max_iter
    if args.tol is not None:
        kwargs["tol"] = args.tol
    result = spec.load().fit(data, config, **kwargs)
    # Per-voxel posterior summaries (sd, interval, entropy) go beside the consensus.
    result = attach(result, args.interval_mass, random_seed=args.seed if args.seed is not None else 0)
    from .. import report

    command = getattr(args, "command_line", " ".join(sys.argv))
    report.stamp(result, command)
    written = result.save(args.out, force=args.force)
    if args.report:
        written.append(report.write_report(result, args.out, data=data, command=command, force=args.force))
    if not args.quiet:
        dt = time.perf_counter() - t0
        it = f", {result.n_iter} iterations" if result.n_iter else ""
        conv = "" if result.converged is None else (", converged" if result.converged else ", NOT converged (raise --max-iter?)")
        print(f"{args.method}: {data.n_raters} raters, {'x'.join(map(str, data.shape))} voxels{it}{conv}, {dt:.1f} s")
        reason = result.tree["optimizer"].attrs.get("stop_reason", "") if "optimizer" in result.tree.children else ""
        if reason:
            print(f"  stopped: {reason}")
        for w in written:
            print(f"  wrote {w}")
    return 0
