"""The method comparison study on the real data (issue 10; seed 000, Fig. 4).

Runs :func:`bayesfuse.compare.compare_cases` on the shared data sets and
writes, per data set, ``OUT/<dataset>/`` (scores.csv, summary.csv,
wilcoxon.csv, boxplots.png, study.json), then ``OUT/RESULTS.md``: the
median Dice and HD95 of every method on every data set, with the
significance flags of the Wilcoxon tests against the reference method.

Data sets (``--datasets``, comma-separated):

``lidc``
    LIDC nodules annotated by at least three radiologists (the paper's
    selection), one crop per nodule: the slice where the radiologists'
    majority vote is largest. All three splits of the source are used (115
    nodules; nothing is trained here, so the split does not matter): slices
    of one nodule are strongly correlated, so the nodule, not the slice, is
    the unit of the paired tests (every nodule by default; ``--lidc-step``
    takes every N-th). Reference: the source's consensus, which
    is the majority vote of the radiologists (ties to foreground), as the
    paper does for LIDC. The methods fuse the same radiologists, so majority
    vote is scored against itself (Dice 1): read this set as agreement with
    the vote, and ``lidc-loo`` as accuracy.
``lidc-loo``
    the same crops, leave-one-rater-out: each radiologist in turn is the
    reference and the others are fused. Every third nodule by default
    (``--loo-step``; 39 of 115): with three or four held-out radiologists
    per nodule this set costs four times ``lidc``.
``liver-loo``
    the liver tumour CT (3-D, three radiologists), leave-one-rater-out; the
    three held-out radiologists are the three units of the table (one case:
    no test can reach significance, min two-sided p = 0.25).
``bubil-experts``
    BU-BIL cell images (811 x 1024); experts only; reference: the data's gold
    standard. Every third image of the 35 (B01, B04, ..., B34: 12 images) by
    default (``--bubil-step``): the robust models take minutes per image on
    the shared machine. The gold standard equals expert Person2's masks,
    from both tools (Person2_Amira and Person2_ImageJ are identical to it on
    all 35 images), so ``exclude_gold_rater`` leaves both out: 8 experts are
    fused.
``bubil-all``
    the same, the 8 experts (without Person2) and the seven crowd workers.
``bubil-experts-gold-in``
    experts only, Person2's two masks kept in (10 experts): the leakage the
    other BU-BIL sets avoid, measured on a few methods (:data:`LEAKY_METHODS`).

Binary masks become probability maps by the geodesic conversion (seed 000,
section 2.1) for every method that fuses probabilities; majority vote and
STAPLE get the masks. The study runs in this process, one fit at a time
(``workers=0``: the machine is shared).

Command (from the repository root)::

    /work/venv/bin/python benchmarks/study.py --out benchmarks/study

The subsets of the committed run (``benchmarks/study/``, on a shared 2-core
machine) are in ``benchmarks/README.md``, section "Method comparison study".
A data set whose ``study.json`` exists is skipped (``--force`` redoes it), so
the study can be run in parts and ``RESULTS.md`` regenerated at the end.
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
EXTRA = ("soft-staple-simplified", "soft-staple", "pstaple", "pstaple:mrf_beta=1", "mixture")
DATASETS = ("lidc", "lidc-loo", "liver-loo", "bubil-experts", "bubil-all", "bubil-experts-gold-in")
#: Methods of the leakage check (the gold standard's own rater fused in).
LEAKY_METHODS = ("majority-vote", "staple", "mean", "pstaple:mrf_beta=0.5")
#: The method the others are tested against: the paper's own ("Student"),
#: else PSTAPLE.
AGAINST = ("robust-t", "pstaple:mrf_beta=0.5")


def available(methods) -> tuple[list[str], list[str]]:
    """Methods whose zoo name is registered, and those missing."""
    have, missing = [], []
    for m in methods:
        (have if m.split(":")[0] in REGISTRY else missing).append(m)
    return have, missing


def lidc_nodules(root) -> list[tuple[str, str]]:
    """(split, slice id) of one slice per nodule with 3+ radiologists: the
    slice with the largest majority vote (ties: the first)."""
    best: dict[str, tuple[int, str, str]] = {}
    for split in ("train", "validate", "test"):
        for i in datasets.lidc_cases(split, root, min_raters=3):
            nodule = i.rsplit("_slice", 1)[0]
            area = int(datasets.lidc_case(i, split, root).reference.sum())
            if nodule not in best or area > best[nodule][0]:
                best[nodule] = (area, split, i)
    return [(split, i) for _, (_, split, i) in sorted(best.items())]


def cases(name: str, root, limit: int | None, bubil_step: int = 3, loo_step: int = 3, lidc_step: int = 1):
    """(cases, compare options) of one data set."""
    if name in ("lidc", "lidc-loo"):
        out = []
        nodules = lidc_nodules(root)
        nodules = nodules[::loo_step] if name == "lidc-loo" else nodules[::lidc_step]
        for split, i in nodules[:limit]:
            c = datasets.lidc_case(i, split, root)
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
    if name in ("bubil-experts", "bubil-all", "bubil-experts-gold-in"):
        raters = "all" if name == "bubil-all" else "experts"
        out = []
        for i in datasets.bubil_images(root)[::bubil_step][:limit]:
            c = datasets.bubil_case(i, raters=raters, root=root, exclude_gold_rater=name != "bubil-experts-gold-in")
            out.append((i, (c.raters, c.reference)))
        return out, {"reference": "given"}
    raise SystemExit(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")


def results_markdown(out: Path, names: list[str], methods: list[str], missing: list[str], command: str) -> str:
    """Median Dice / HD95 per method and data set, flags of the tests."""
    lines = [f"Command: `{command}`", ""]
    if missing:
        lines += [f"Not in the zoo when the study ran (left out): {', '.join(missing)}.", ""]
    for metric, better in (("dice", "higher"), ("hd95", "lower"), ("hausdorff", "lower")):
        # LIDC crops and BU-BIL PNGs carry no geometry: unit spacing.
        unit = "" if metric == "dice" else " (mm for liver-loo; pixels for the 2-D sets)"
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
    p.add_argument("--bubil-step", type=int, default=3, help="every N-th BU-BIL image (default 3: 12 of 35; 1: all)")
    p.add_argument("--lidc-step", type=int, default=1, help="lidc: every N-th nodule (default 1: all 115)")
    p.add_argument("--loo-step", type=int, default=3, help="lidc-loo: every N-th nodule (default 3: 39 of 115; 1: all)")
    p.add_argument("--to-prob", default="geodesic")
    p.add_argument("--force", action="store_true", help="redo data sets whose outputs exist")
    p.add_argument("--replot", action="store_true",
                   help="redraw the box plots of data sets done earlier from their scores.csv and wilcoxon.csv")
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
            if args.replot:
                title = json.loads((d / "study.json").read_text())["title"]
                cmp.plot_boxes(pd.read_csv(d / "scores.csv"), pd.read_csv(d / "wilcoxon.csv"), d / "boxplots.png", title=title)
            continue
        t0 = time.perf_counter()
        items, opts = cases(name, args.root, args.limit, args.bubil_step, args.loo_step, args.lidc_step)
        these = [m for m in methods if m in LEAKY_METHODS] if name == "bubil-experts-gold-in" else methods
        vs = against if against in these else these[-1]
        print(f"{name}: {len(items)} cases, {len(these)} methods", flush=True)
        cmp.compare_cases(items, these, d, against=vs, to_prob=args.to_prob, workers=0, force=True,
                          title=name, progress=False, **opts)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    md = results_markdown(out, names, methods, missing, command)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}"
    (out / "RESULTS.md").write_text(md + f"\nMachine: {machine}; shared with other jobs while it ran.\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
