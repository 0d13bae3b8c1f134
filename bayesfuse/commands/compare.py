"""``bayesfuse compare``: a method comparison study on a dataset (seed 000, Fig. 4)."""

from __future__ import annotations

import argparse

from .common import add_quiet, parse_pairs


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "compare",
        help="compare fusion methods on a dataset: scores, box plots, Wilcoxon tests",
        description="Run every method on every case of DATASET (a CSV manifest or a study folder, as for "
        "`bayesfuse batch`), score each consensus against a reference (Dice, HD95, Hausdorff in mm, soft "
        "Dice), and write DIR/scores.csv, DIR/summary.csv, DIR/wilcoxon.csv (paired Wilcoxon signed-rank "
        "tests of each method against --against, p < 0.05 flagged, Holm-corrected p beside), "
        "DIR/boxplots.png and DIR/study.json. Many cases run on a local Dask cluster.",
        epilog="Methods take options after colons: gaussian:spatial_prior=false, pstaple:mrf_beta=0.5, "
        "robust-t:to_prob=geodesic:prob_slope=1.5 (to_prob / prob_* choose that method's conversion of "
        "binary masks). Example: bayesfuse compare study/ --methods majority-vote,staple,pstaple "
        "--leave-one-rater-out --out cmp/",
    )
    p.add_argument("dataset", metavar="DATASET", help="CSV manifest or study folder")
    p.add_argument("--methods", required=True, metavar="M1,M2,...", help="methods to compare (zoo names with :key=value options)")
    p.add_argument("--reference", default="majority-vote", metavar="REF",
                   help="majority-vote (of all the case's raters; default), manifest (the manifest's reference files), "
                   "or a FILE-PATTERN with {subject}, relative to the manifest's folder")
    p.add_argument("--leave-one-rater-out", action="store_true",
                   help="each rater in turn is the reference and the others are fused (cases need 3+ raters)")
    p.add_argument("--against", metavar="METHOD", help="the method every other is tested against (default: the first)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the flags (default 0.05, as the paper)")
    p.add_argument("--zero-method", default="wilcox", choices=["wilcox", "pratt", "zsplit"],
                   help="scipy.stats.wilcoxon's treatment of zero differences (default: wilcox, they are dropped)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--title", default="", help="title of the box plots")
    p.add_argument("--force", action="store_true", help="overwrite an earlier study's outputs")
    g = p.add_argument_group("Dask")
    g.add_argument("--workers", type=int, metavar="N", help="local cluster size (default: one per core when there are 8+ cases; 0 runs in this process)")
    g.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler")
    g = p.add_argument_group("input")
    g.add_argument("--kind", choices=["binary", "labels", "probability"], help="declare what the raters' maps hold (inferred by default)")
    g.add_argument("--classes", type=int, metavar="K", help="number of classes K of label maps")
    g.add_argument("--invert", action="store_true", help="2-D masks drawn dark on light: read pixels < 128 as foreground")
    g.add_argument("--spacing", type=float, nargs="+", metavar="MM", help="pixel size for files without geometry (PNG, TIFF)")
    g = p.add_argument_group("binary masks to probabilities")
    g.add_argument("--to-prob", default="none", choices=["none", "euclidean", "geodesic", "soft-dilation"],
                   help="conversion for the methods that fuse probabilities (methods of hard labels get the masks; default: none)")
    g.add_argument("--prob-opt", action="append", default=[], metavar="KEY=VALUE", help="option of the conversion (repeatable)")
    g = p.add_argument_group("solver (every method)")
    g.add_argument("--max-iter", type=int, help="maximum iterations (each model's default otherwise)")
    g.add_argument("--tol", type=float, help="convergence tolerance (each model's default otherwise)")
    g.add_argument("--seed", type=int, default=None, help="random seed")
    add_quiet(p)
    return p


def run(args) -> int:
    from ..compare import compare

    res = compare(
        args.dataset, args.methods, args.out, reference=args.reference,
        kind=args.kind, n_classes=args.classes, invert=args.invert, spacing=args.spacing,
        leave_one_rater_out=args.leave_one_rater_out, against=args.against, alpha=args.alpha,
        zero_method=args.zero_method, to_prob=args.to_prob, to_prob_options=parse_pairs(args.prob_opt, "--prob-opt"),
        max_iter=args.max_iter, tol=args.tol, random_seed=args.seed, workers=args.workers,
        scheduler=args.scheduler, title=args.title, force=args.force, progress=None if not args.quiet else False,
    )
    if not args.quiet:
        scores, tests = res["scores"], res["wilcoxon"]
        failed = scores[scores["error"].astype(str) != ""]
        print(f"compared {scores['method'].nunique()} methods on {scores['case'].nunique()} cases; outputs in {args.out}/")
        dice = tests[tests["metric"] == "dice"]
        for _, r in dice.iterrows():
            flag = "*" if r["significant"] else " "
            print(f"  {flag} {r['method']:<32} Dice median {r['median']:.3f} vs {r['median_against']:.3f} "
                  f"({r['direction']}, p = {r['p_value']:.3g}, Holm {r['p_holm']:.3g}, n = {r['n']})")
        if len(failed):
            print(f"  {len(failed)} fit(s) failed; see the error column of scores.csv")
    return 0
