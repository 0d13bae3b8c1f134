"""``bayesfuse models``: the zoo, one line per model."""

from __future__ import annotations

import dataclasses


def add_parser(sub):
    p = sub.add_parser("models", help="list the fusion methods", description="List the zoo's fusion methods.")
    p.add_argument("--verbose", "-v", action="store_true", help="also list each method's options and defaults")
    return p


def run(args) -> int:
    from ..models import list_models

    specs = list_models()
    width = max(len(s.name) for s in specs)
    for s in specs:
        pymc = "PyMC+NUTS" if s.pymc else "no PyMC  "
        print(f"{s.name:<{width}}  [{s.input:<11}] {pymc}  {s.summary}")
        if args.verbose:
            if s.note:
                print(f"{'':<{width}}    note: {s.note}")
            cfg = s.config()
            for f in dataclasses.fields(cfg):
                print(f"{'':<{width}}    -o {f.name}={getattr(cfg, f.name)!r}")
    return 0
