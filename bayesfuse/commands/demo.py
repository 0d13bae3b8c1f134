"""``bayesfuse demo``: make a 3-D phantom, fuse it, and score it against the truth."""

from __future__ import annotations

import sys
import time
from pathlib import Path

#: The demo uses the first method of this list that the zoo has: the most
#: complete model first.
PREFERENCE = ("robust-t", "soft-staple", "staple", "mean", "majority-vote")


def add_parser(sub):
    p = sub.add_parser(
        "demo",
        help="fuse a built-in 3-D phantom and score it against its truth",
        description="Make a synthetic 3-D case with known truth (raters that over- and under-segment, "
        "one with a local outlier region), fuse it with the best model available, write the outputs "
        "and print how the consensus and every rater score against the truth.",
    )
    p.add_argument("--out", default="bayesfuse-demo", metavar="DIR", help="output folder (default: ./bayesfuse-demo)")
    p.add_argument("--method", "-m", help="method to use (default: the best available)")
    p.add_argument("--phantom", default="outlier", metavar="KIND", help="phantom kind (default: outlier)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the phantom and the solver")
    p.add_argument("--force", action="store_true", help="overwrite an earlier demo's outputs")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def choose_method(requested: str | None) -> str:
    from ..models import REGISTRY, get_model

    if requested:
        return get_model(requested).name
    return next(m for m in PREFERENCE if m in REGISTRY)


def run(args) -> int:
    from .. import api, metrics, phantoms
    from ..models import get_model
    from ..result import CORE_OUTPUTS
    from .common import check_out_dir

    method = choose_method(args.method)
    spec = get_model(method)
    out = check_out_dir(args.out, list(CORE_OUTPUTS), args.force)
    t0 = time.perf_counter()
    ph = phantoms.make_phantom(args.phantom, ndim=3, random_seed=args.seed)
    data = ph.raters
    if spec.input == "probability" and data.kind == "binary" and data.image is not None:
        data = api.convert(data, "geodesic")
    result = spec.load().fit(data, spec.config(), random_seed=args.seed, method=method)
    written = result.save(out, force=args.force)
    truth = ph.truth
    cons = result.labels.values
    lines = [
        f"bayesfuse demo: phantom {args.phantom!r}, {data.n_raters} raters, {'x'.join(map(str, data.shape))} voxels, "
        f"method {method} ({time.perf_counter() - t0:.1f} s)",
        _convergence_line(result),
        f"  consensus vs truth: Dice {metrics.dice(cons, truth):.3f}, "
        f"HD95 {metrics.hd95(cons, truth, data.spacing):.2f} mm",
    ]
    mv = api.fuse(ph.raters, "majority-vote")
    lines.append(f"  majority vote vs truth: Dice {metrics.dice(mv.labels.values, truth):.3f}  (baseline)")
    for name, lab in zip(ph.raters.rater_names, ph.raters.labels()):
        lines.append(f"  rater {name:<10} vs truth: Dice {metrics.dice(lab, truth):.3f}")
    lines.append("  per-rater estimates (raters.csv):")
    lines.append("    " + result.raters.round(3).to_string().replace("\n", "\n    "))
    lines.append(f"  outputs in {Path(out).resolve()}:")
    lines += [f"    {Path(w).name}" for w in written]
    print("\n".join(lines), file=sys.stdout)
    return 0


def _convergence_line(result) -> str:
    """Whether the fit converged and why it stopped, as ``bayesfuse fuse`` prints it."""
    conv = result.converged
    state = "-" if conv is None else ("converged" if conv else "NOT converged")
    reason = result.tree["optimizer"].attrs.get("stop_reason", "") if "optimizer" in result.tree.children else ""
    return f"  solver: {state} after {result.n_iter} iterations" + (f" ({reason})" if reason else "")
