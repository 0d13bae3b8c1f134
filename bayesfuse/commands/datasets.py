"""``bayesfuse datasets``: export a case of the shared real data as NIfTI files."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "datasets",
        help="export a case of the real data sets (liver-tumor, lidc, bu-bil) as NIfTI files",
        description="Write one case of ../shared/data as one NIfTI file per rater, image.nii.gz, "
        "reference.nii.gz and groups.csv, with each data set's quirks handled (BU-BIL: masks drawn "
        "black, crowd crops aligned to the experts' majority vote).",
    )
    p.add_argument("dataset", choices=["liver-tumor", "lidc", "bu-bil"])
    p.add_argument("case", nargs="?", help="case id (LIDC file stem, BU-BIL image id such as B01)")
    p.add_argument("--split", default="test", help="LIDC split (train, validate, test)")
    p.add_argument("--raters", default="all", choices=["all", "experts", "crowd"], help="BU-BIL raters")
    p.add_argument("--root", help="the shared data folder (default: BAYESFUSE_SHARED_DATA or ../shared/data)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def run(args) -> int:
    from .. import datasets

    case = datasets.load(args.dataset, args.case, root=args.root, split=args.split, raters=args.raters)
    written = datasets.export_case(case, args.out, force=args.force)
    if not args.quiet:
        print(f"{case.name}: {case.raters.n_raters} raters, {'x'.join(map(str, case.raters.shape))}")
        for w in written:
            print(f"  wrote {w}")
    return 0
