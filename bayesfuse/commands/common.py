"""Options shared by several subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info messages")


def add_input_options(p: argparse.ArgumentParser) -> None:
    """Options that say how to read the raters' files."""
    g = p.add_argument_group("input")
    g.add_argument("--image", metavar="IMG", help="intensity image on the raters' grid (geodesic maps, soft masks, report)")
    g.add_argument("--mask", metavar="ROI", help="region of interest (0/1); outside it the consensus is background")
    g.add_argument("--kind", choices=["binary", "labels", "probability"], help="declare what the raters' maps hold (inferred by default)")
    g.add_argument("--classes", type=int, metavar="K", help="number of classes K of label maps")
    g.add_argument("--invert", action="store_true", help="2-D masks drawn dark on light: read pixels < 128 as foreground")
    g.add_argument("--spacing", type=float, nargs="+", metavar="MM", help="pixel size for files without geometry (PNG, TIFF)")


def add_to_prob_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("binary masks to probabilities")
    g.add_argument("--to-prob", default="none", choices=["none", "euclidean", "geodesic", "soft-dilation"],
                   help="convert binary masks before fusing (default: none)")
    g.add_argument("--prob-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the conversion, e.g. slope=1.5 or gamma=0.3 (repeatable)")


def add_solver_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("solver")
    g.add_argument("--max-iter", type=int, help="maximum iterations (model default otherwise)")
    g.add_argument("--tol", type=float, help="convergence tolerance on the objective (model default otherwise)")
    g.add_argument("--seed", type=int, default=None, help="random seed (results are reproducible for a given seed)")
    g.add_argument("--opt", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. -o likelihood=gaussian -o spatial_prior=false (repeatable; `bayesfuse models -v` lists them)")


def parse_value(text: str):
    """Read an option value: booleans, numbers, lists (comma-separated), or text."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "," in text:
        return tuple(parse_value(t) for t in text.split(","))
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_pairs(pairs: list[str], what: str) -> dict:
    out = {}
    for item in pairs:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = parse_value(v)
    return out


def check_out_dir(out: str | Path, names: list[str], force: bool) -> Path:
    """Refuse to overwrite before any work is done (save() checks again)."""
    from ..io import check_outputs

    return check_outputs(out, names, force)
