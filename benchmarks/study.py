"""The method comparison study on the real data (issue 10; seed 000, Fig. 4).

Runs :func:`bayesfuse.compare.compare_cases` on the shared data sets and
writes, per data set, ``OUT/<dataset>/`` (scores.csv, summary.csv,
wilcoxon.csv, boxplots.png, study.json), then ``OUT/RESULTS.md``: the
median Dice and HD95 of every method on every data set, with the
significance flags of the Wilcoxon tests against the reference method.

Data sets (``--datasets``, comma-separated):

``lidc``
    LIDC test split, crops with at least three radiologists (the paper keeps
    nodules "annotated by at least 3 radiologists"); reference: the source's
    consensus, which is the majority vote of the radiologists (ties to
    foreground), as the paper does for LIDC. The methods fuse the same
    radiologists, so majority vote is scored against itself (Dice 1): read
    this set as agreement with the vote, and ``lidc-loo`` as accuracy.
``lidc-loo``
    the same crops, leave-one-rater-out: each radiologist in turn is the
    reference and the others are fused.
``liver-loo``
    the liver tumour CT (3-D, three radiologists), leave-one-rater-out; the
    three held-out radiologists are the three units of the table (one case:
    no test can reach significance, min two-sided p = 0.25).
``bubil-experts``
    BU-BIL, 35 cell images; experts only; reference: the data's gold
    standard. The gold standard is expert Person2_Amira's masks (identical on
    every image), so that expert is left out of the fusion (the same
    person's ImageJ masks stay in).
``bubil-all``
    the same, experts (without Person2_Amira) and the seven crowd workers.

Binary masks become probability maps by the geodesic conversion (seed 000,
section 2.1) for every method that fuses probabilities; majority vote and
STAPLE get the masks. The study runs in this process, one fit at a time
(``workers=0``: the machine is shared).

Command (from the repository root)::

    /work/venv/bin/python benchmarks/study.py --out benchmarks/study
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pandas as pd

from bayesfuse import compare as cmp
from bayesfuse import datasets
from bayesfuse.models import REGISTRY

#: The paper's nine methods (Fig. 4) in the zoo's names, then the zoo's
#: other methods for binary / soft segmentations, then PSTAPLE's MRF
#: strength varied (the seed notes PSTAPLE's sensitivity to it).
PAPER = (
    "majority-vote", "staple", "pstaple:mrf_beta=0.5", "continuous-staple",
    "gaussian", "gaussian:spatial_prior=false", "robust-t", "robust-t:spatial_prior=false", "mean",
)
EXTRA = ("soft-staple-simplified", "soft-staple", "pstaple", "pstaple:mrf_beta=1")
DATASETS = ("lidc", "lidc-loo", "liver-loo", "bubil-experts", "bubil-all")
#: The method the others are tested against: the paper's own ("Student"),
#: else PSTAPLE.
AGAINST = ("robust-t", "pstaple:mrf_beta=0.5")


def available(methods) -> tuple[list[str], list[str]]:
    """Methods whose zoo name is registered, and those missing."""
    have, missing = [], []
    for m in methods:
        (have if m.split(":")[0] in REGISTRY else missing).append(m)
    return have, missing


def cases(name: str, root, limit: int | None):
    """(cases, compare options) of one data set."""
    if name in ("lidc", "lidc-loo"):
        ids = datasets.lidc_cases("test", root, min_raters=3)[:limit]
        out = []
        for i in ids:
            c = datasets.lidc_case(i, "test", root)
            out.append((i, (c.raters, c.reference) if name == "lidc" else c.raters))
        return out, {"reference": "given", "leave_one_rater_out": name == "lidc-loo"}
    if name == "liver-loo":
        c = datasets.liver_tumor(root)
        data, labels = c.raters, c.raters.labels()
        out = []
        for i, r in enumerate(data.rater_names):
            rest = [j for j in range(data.n_raters) if j != i]
            out.append((f"held-out {r}", (data.subset(rest), labels[i])))
        return out[:limit], {"reference": "given"}
    if name in ("bubil-experts", "bubil-all"):
        raters = "experts" if name == "bubil-experts" else "all"
        out = []
        for i in datasets.bubil_images(root)[:limit]:
            c = datasets.bubil_case(i, raters=raters, root=root, exclude_gold_rater=True)
            out.append((i, (c.raters, c.reference)))
        return out, {"reference": "given"}
    raise SystemExit(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")


def results_markdown(out: Path, names: list[str], methods: list[str], missing: list[str], command: str) -> str:
    """Median Dice / HD95 per method and data set, flags of the tests."""
    lines = [f"Command: `{command}`", ""]
    if missing:
        lines += [f"Not in the zoo when the study ran (left out): {', '.join(missing)}.", ""]
    for metric, better in (("dice", "higher"), ("hd95", "lower"), ("hausdorff", "lower")):
        unit = "" if metric == "dice" else " (mm)"
        lines += [f"Median {metric}{unit} ({better} is better); `*` p < 0.05, `**` also after Holm's correction, "
                  "against the bold method; arrows: the method's direction.", ""]
        head = ["method"] + names
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        table = {}
        for n in names:
            d = out / n
            if not (d / "summary.csv").is_file():
                continue
            s = pd.read_csv(d / "summary.csv").query("metric == @metric").set_index("method")
            w = pd.read_csv(d / "wilcoxon.csv").query("metric == @metric").set_index("method")
            against = json.loads((d / "study.json").read_text())["against"]
            for m in s.index:
                cell = f"{s.loc[m, 'median']:.3f}" if metric == "dice" else f"{s.loc[m, 'median']:.2f}"
                if m == against:
                    cell = f"**{cell}**"
                elif m in w.index and w.loc[m, "significant"]:
                    arrow = {"better": " ↑", "worse": " ↓"}.get(w.loc[m, "direction"], "")
                    cell += (" **" if w.loc[m, "significant_holm"] else " *") + arrow
                if s.loc[m, "failed"]:
                    cell += f" ({int(s.loc[m, 'failed'])} failed)"
                table.setdefault(m, {})[n] = cell
        for m in methods:
            if m in table:
                lines.append("| " + " | ".join([m] + [table[m].get(n, "") for n in names]) + " |")
        lines.append("")
    lines.append("Cases per data set: " + ", ".join(
        f"{n}: {json.loads((out / n / 'study.json').read_text())['n_scored_cases']}" for n in names if (out / n / "study.json").is_file()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--methods", help="comma-separated (default: the paper's nine where the zoo has them, and extras)")
    p.add_argument("--out", default="benchmarks/study")
    p.add_argument("--root", help="shared data folder (default: ../shared/data)")
    p.add_argument("--limit", type=int, help="first N cases of each data set (a quick look)")
    p.add_argument("--to-prob", default="geodesic")
    p.add_argument("--force", action="store_true", help="redo data sets whose outputs exist")
    args = p.parse_args(argv)

    wanted = args.methods.split(",") if args.methods else list(PAPER + EXTRA)
    methods, missing = available(wanted)
    against = next((a for a in AGAINST if a in methods), methods[0])
    out = Path(args.out)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    command = "python benchmarks/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in names:
        d = out / name
        if (d / "study.json").is_file() and not args.force:
            print(f"{name}: done earlier ({d}); --force to redo", flush=True)
            continue
        t0 = time.perf_counter()
        items, opts = cases(name, args.root, args.limit)
        print(f"{name}: {len(items)} cases, {len(methods)} methods", flush=True)
        cmp.compare_cases(items, methods, d, against=against, to_prob=args.to_prob, workers=0, force=True,
                          title=name, progress=False, **opts)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    md = results_markdown(out, names, methods, missing, command)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}"
    (out / "RESULTS.md").write_text(md + f"\nMachine: {machine}; shared with other jobs while it ran.\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
