"""``bayesfuse check``: cross-check a model's solver against NUTS (bayesfuse.crosscheck)."""

from __future__ import annotations

import argparse

from .common import add_input_options, add_quiet, check_out_dir, parse_pairs

EPILOG = """exit codes: 0 the solver agrees with NUTS on every criterion; 1 it disagrees;
3 NUTS is not healthy (r_hat > 1.01, ESS < 400 or divergences): no agreement is claimed;
2 bad input or options. With --sbc: 0 when every SBC rank test passes, 1 otherwise."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "check",
        help="cross-check a model's VB/EM solver against NUTS on downsampled data",
        description="Fit the model's closed-form solver, sample its PyMC model (hyperparameters pinned at the "
        "solver's estimates) with NUTS (nutpie), check NUTS's health, compare the two posteriors per latent "
        "variable against the model's criteria (its card, section Cross-check), and write DIR/summary.csv, "
        "DIR/crosscheck.nc and figures. With --sbc N: simulation-based calibration instead.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("raters", nargs="*", metavar="RATER_FILE", help="one file per rater, or one 4-D file")
    p.add_argument("--method", "-m", required=True, help="model to check (see `bayesfuse models`; needs a PyMC form)")
    p.add_argument("--phantom", metavar="KIND", help="check on a built-in synthetic case (bayesfuse.phantoms) instead of files")
    p.add_argument("--downsample", type=int, nargs="+", default=None, metavar="F",
                   help="block size per axis (one value for all) to make the problem small enough for NUTS")
    p.add_argument("--downsample-how", choices=["mean", "majority", "stride"], default=None,
                   help="how blocks are reduced (default: the model's: majority of binary masks for STAPLE, "
                   "block average otherwise, which turns masks into probability maps)")
    p.add_argument("--draws", type=int, default=1000, metavar="D", help="NUTS draws per chain (default 1000)")
    p.add_argument("--tune", type=int, default=1000, help="NUTS tuning steps per chain (default 1000)")
    p.add_argument("--chains", type=int, default=4, metavar="C", help="NUTS chains (default 4)")
    p.add_argument("--target-accept", type=float, default=0.9, help="NUTS target acceptance (default 0.9)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the phantom, solver, q draws and NUTS")
    p.add_argument("--opt", "-o", action="append", default=[], metavar="KEY=VALUE", help="model option (repeatable)")
    p.add_argument("--sbc", type=int, default=0, metavar="N",
                   help="simulation-based calibration with N simulations from the model's prior instead")
    p.add_argument("--sbc-shape", type=int, nargs="+", default=[12, 12, 8], help="spatial shape of each SBC simulation")
    p.add_argument("--sbc-raters", type=int, default=4, help="raters of each SBC simulation")
    p.add_argument("--sbc-nuts", action="store_true", help="also rank the truth among NUTS draws (slow)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    add_input_options(p)
    add_quiet(p)
    return p


def _data(args, how_default: str):
    from .fuse import load_input

    data = load_input(args)
    note = ""
    if args.downsample:
        f = args.downsample[0] if len(args.downsample) == 1 else tuple(args.downsample)
        how = args.downsample_how or how_default
        before = data
        data = data.downsample(f, how)
        note = f"downsampled x{f} by {how} from {'x'.join(map(str, before.shape))}"
    if args.phantom:
        note = f"phantom {args.phantom!r}" + (f", {note}" if note else "")
    return data, note


#: Libraries whose INFO messages (backends found, config keys) would bury the verdict.
QUIET_LOGGERS = ("pytensor", "pymc", "arviz", "arviz_base", "arviz_stats", "arviz_plots", "matplotlib", "numba")


def run(args) -> int:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    from .. import crosscheck
    from ..crosscheck_models import criteria_for
    from ..models import get_model

    spec = get_model(args.method)
    config = spec.config(**parse_pairs(args.opt, "--opt"))
    crit = criteria_for(args.method)
    if args.sbc:
        from .. import crosscheck_sbc

        check_out_dir(args.out, list(crosscheck_sbc.OUTPUTS), args.force)
        res = crosscheck_sbc.run(args.method, n_sims=args.sbc, shape=tuple(args.sbc_shape), n_raters=args.sbc_raters,
                                 options=parse_pairs(args.opt, "--opt"), random_seed=args.seed, nuts=args.sbc_nuts,
                                 draws=args.draws, tune=args.tune, chains=args.chains)
        res.write(args.out, force=args.force)
        print(res.verdict())
        return 0 if res.passed else 1
    check_out_dir(args.out, list(crosscheck.OUTPUTS), args.force)
    data, note = _data(args, crit.downsample)
    cc = crosscheck.run(data, args.method, config=config, draws=args.draws, tune=args.tune, chains=args.chains,
                        random_seed=args.seed, target_accept=args.target_accept, note=note)
    written = cc.write(args.out, force=args.force)
    print(cc.verdict())
    if not args.quiet:
        for w in written:
            print(f"  wrote {w}")
    return cc.exit_code
