"""``bayesfuse report RESULT_DIR``: write the HTML report of a saved result."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report of a result folder",
        description="Read RESULT_DIR/result.nc (written by `bayesfuse fuse`) and write RESULT_DIR/report.html: "
        "slices of the consensus with its sd, interval width and entropy, per-rater maps (tau), rater "
        "estimates with intervals, the objective trace, and the command and versions that made it. "
        "One file, figures embedded, no external resources.",
    )
    p.add_argument("result_dir", metavar="RESULT_DIR", help="folder holding result.nc (or the result.nc file itself)")
    p.add_argument("--image", metavar="IMG", help="intensity image on the result's grid, drawn under the slices")
    p.add_argument("--raters", nargs="+", metavar="RATER_FILE", help="the raters' files, to draw their contours")
    p.add_argument("--mass", type=float, default=None, metavar="M",
                   help="credible mass of the intervals when the result holds none yet (default 0.9)")
    p.add_argument("--out", metavar="FILE", help="report file (default: RESULT_DIR/report.html)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def run(args) -> int:
    from .. import report
    from ..errors import InputError
    from ..result import FusionResult

    src = Path(args.result_dir)
    nc = src / "result.nc" if src.is_dir() else src
    if not nc.exists():
        raise InputError(str(nc), "no such file (give a folder written by `bayesfuse fuse`)")
    try:
        result = FusionResult.load(nc)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(str(nc), f"cannot be read as a bayesfuse result ({type(exc).__name__}: {exc})") from None
    if args.mass is not None:
        from ..summaries import check_mass

        check_mass(args.mass)
    out = Path(args.out) if args.out else nc.parent / report.REPORT_NAME
    if out.exists() and not args.force:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"{out}: exists; use --force to overwrite")
    shape = tuple(result.labels.shape)
    data = None
    image = None
    if args.raters:
        from .. import api

        data = api.as_rater_maps(args.raters, image=args.image)
        if tuple(data.shape) != shape:
            raise InputError(str(args.raters[0]), f"shape {data.shape} differs from the result's {shape}")
    elif args.image:
        from ..io import read_image

        image = read_image(args.image)[0].astype("float32")
        if tuple(image.shape) != shape:
            raise InputError(str(args.image), f"shape {image.shape} differs from the result's {shape}")
    path = report.write_report(result, out.parent, data=data, image=image, force=args.force, mass=args.mass, name=out.name)
    if not args.quiet:
        print(f"wrote {path}")
    return 0
