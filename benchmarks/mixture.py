"""Mixture of consensuses: whole-fit time and peak memory on a full volume, and the BU-BIL study.

``bench`` (default): 9 raters drawn around three truths
(``make_phantom("clusters", n_clusters=3)``, clean: offsets within +-0.25 mm,
boundary noise 0.3 mm), 180 x 256 x 256 voxels, as uint8 masks and as
float32 probability maps (the masks softened to 0.05 / 0.95 with a little
noise, so that every voxel is a genuine probability). Every case runs in its
own process, after a warm-up fit on a small volume (numba kernels compiled or
loaded from the cache). Measured in the same run:

- ``floor``: one read pass over the input (``count_nonzero`` of the masks,
  ``sum`` of the maps), best of 5;
- ``mixture``: the whole ``bayesfuse.fuse(data, "mixture")`` call (Gram
  pass, PCA, the incremental VB, the pass mapping the consensus maps back,
  the result tree with its input checksum), best of ``--repeat``, with the
  process's CPU time of that call (all threads; on a shared machine it
  moves less than the wall time).

Peak memory: the resident-set high-water mark during the call (reset through
``/proc/self/clear_refs`` just before it) minus the resident set before the
input was loaded, i.e. the input plus everything the call needs, over the
input's float32 size (4 P N bytes), the figure the issue bounds by 4.

``bubil``: the mixture on every image of ``../shared/data/bu-bil-dataset1``
(10 experts, 7 crowd workers), with the number of components, the stop
reason, the experts and crowd workers in each component, and the adjusted
Rand index between the components and the groups (expert / crowd) and the
annotation tools (Amira / ImageJ / crowd).

Run::

    /work/venv/bin/python benchmarks/mixture.py [--shape 180 256 256] [--repeat 3]
    /work/venv/bin/python benchmarks/mixture.py bubil [--images B01 B02] [--stop-rule joins+elbo]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _memory import reset_peak, status_kib  # benchmarks/ is sys.path[0] when run as a script

CASES = ("binary", "probability")


def adjusted_rand_index(a, b) -> float:
    """Hubert and Arabie's ARI from the contingency table."""
    from scipy.special import comb

    _, ia = np.unique(np.asarray(a), return_inverse=True)
    _, ib = np.unique(np.asarray(b), return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(table, (ia, ib), 1)
    index = comb(table, 2).sum()
    rows, cols = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum()
    expected = rows * cols / comb(len(ia), 2)
    top = (rows + cols) / 2
    return 1.0 if top == expected else float((index - expected) / (top - expected))


# ---------------------------------------------------------------- benchmark
def make_inputs(folder: Path, shape) -> str:
    from bayesfuse.phantoms import make_phantom

    t0 = time.perf_counter()
    ph = make_phantom("clusters", shape=tuple(shape), n_clusters=3, n_raters=9, random_seed=0,
                      max_offset_mm=0.25, noise_mm=0.3)
    masks = ph.raters.binary()
    np.save(folder / "masks.npy", masks)
    np.save(folder / "membership.npy", ph.membership)
    rng = np.random.default_rng(1)
    for i in range(masks.shape[0]):  # one rater at a time: the stack is 4 bytes per voxel
        soft = np.where(masks[i] == 1, np.float32(0.95), np.float32(0.05))
        soft += rng.uniform(-0.04, 0.04, soft.shape).astype(np.float32)
        np.save(folder / f"soft{i}.npy", soft)
    return f"phantom and soft maps {time.perf_counter() - t0:.1f} s"


def warm_up() -> None:
    import bayesfuse
    from bayesfuse.data import RaterMaps

    rng = np.random.default_rng(0)
    m = (rng.random((4, 16, 16, 12)) < 0.4).astype(np.uint8)
    bayesfuse.fuse(RaterMaps.from_arrays(list(m)), "mixture", progress=False)
    bayesfuse.fuse(RaterMaps.from_arrays(list(rng.random(m.shape).astype(np.float32)), kind="probability"), "mixture", progress=False)


def timed(fn, repeat: int) -> tuple[float, object, float]:
    """Best wall time of ``repeat`` calls, the last result, and the CPU time of the best call."""
    best, out, cpu = np.inf, None, np.nan
    for _ in range(repeat):
        out = None
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, time.process_time() - c0
    return best, out, cpu


def main_child(args) -> None:
    import bayesfuse
    from bayesfuse.data import RaterMaps

    folder = Path(args.data)
    warm_up()
    base = status_kib("VmRSS")
    if args.case == "binary":
        arr = np.load(folder / "masks.npy")
        floor = lambda: np.count_nonzero(arr)  # noqa: E731
    else:
        arr = np.stack([np.load(folder / f"soft{i}.npy") for i in range(9)])
        floor = lambda: arr.sum()  # noqa: E731
    p, n = arr.shape[0], int(np.prod(arr.shape[1:]))
    out = {"case": args.case, "input_mb": arr.nbytes / 2**20, "float32_mb": 4 * p * n / 2**20}
    out["floor_seconds"], _, _ = timed(floor, 5)
    data = RaterMaps.from_arrays(arr, kind="binary" if args.case == "binary" else "probability")
    del arr
    reset_peak()
    out["seconds"], res, out["cpu_seconds"] = timed(lambda: bayesfuse.fuse(data, "mixture", progress=False), args.repeat)
    out["peak_mb"] = (status_kib("VmHWM") - base) / 1024
    out["peak_over_float32_input"] = out["peak_mb"] / out["float32_mb"]
    out["n_components"] = int(res.tree.attrs["n_components"])
    out["ari"] = adjusted_rand_index(res.group("raters")["assigned"].values, np.load(folder / "membership.npy"))
    out["iterations"] = res.n_iter
    out["stop_reason"] = res.tree["optimizer"].attrs["stop_reason"]
    print(json.dumps(out))


def main_bench(args) -> None:
    import platform

    with tempfile.TemporaryDirectory(prefix="bayesfuse-mixture-bench-") as tmp:
        folder = Path(tmp)
        prep = make_inputs(folder, args.shape)
        rows = []
        for case in CASES:
            cmd = [sys.executable, __file__, "--case", case, "--data", str(folder), "--repeat", str(args.repeat)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"# mixture, 9 raters, {' x '.join(map(str, args.shape))} voxels; {prep}")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}")
    print("| input | input MB | float32 MB | read pass s | fit s | fit CPU s | fit / read pass | peak MB | peak / float32 input | M | ARI | iterations |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['input_mb']:.0f} | {r['float32_mb']:.0f} | {r['floor_seconds']:.3f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
              f"{r['seconds'] / r['floor_seconds']:.0f} | {r['peak_mb']:.0f} | {r['peak_over_float32_input']:.2f} | "
              f"{r['n_components']} | {r['ari']:.2f} | {r['iterations']} |")
    for r in rows:
        print(f"# {r['case']}: {r['stop_reason']}")


# ---------------------------------------------------------------- BU-BIL
def main_bubil(args) -> None:
    import bayesfuse
    from bayesfuse.datasets import bubil_case, bubil_images

    images = args.images or bubil_images()
    print("| image | M | stop | components: experts/crowd | ARI groups | ARI tools | main component | Dice main / gold | Dice vote / gold |")
    print("|---|---:|---|---|---:|---:|---|---:|---:|")
    counts, aris, tools_ari, pure = [], [], [], 0
    crowd_with_experts, experts_with_experts, dice_main, dice_vote, twins = [], [], [], [], []
    t0 = time.perf_counter()
    for im in images:
        case = bubil_case(im)
        res = bayesfuse.fuse(case.raters, "mixture", progress=False, stop_rule=args.stop_rule)
        names = res.rater_names
        assigned = res.group("raters")["assigned"].values
        group = np.array([case.groups[n] for n in names])
        tool = np.array(["crowd" if g == "crowd" else ("amira" if n.endswith("Amira") else "imagej") for n, g in zip(names, group)])
        m = int(res.tree.attrs["n_components"])
        cells = []
        for k in range(m):
            e = int(np.sum((assigned == k) & (group == "expert")))
            c = int(np.sum((assigned == k) & (group == "crowd")))
            cells.append(f"{e}/{c}")
        a_g, a_t = adjusted_rand_index(assigned, group), adjusted_rand_index(assigned, tool)
        main = assigned == 0
        kind = "experts only" if np.all(group[main] == "expert") else ("crowd only" if np.all(group[main] == "crowd") else "mixed")
        pure += all(len({g for g in group[assigned == k]}) == 1 for k in range(m))
        reason = res.tree["optimizer"].attrs["stop_reason"]
        stop = "joins" if "min_joiners" in reason else ("elbo" if "ELBO" in reason else reason)
        # which raters sit in a component whose majority is experts
        major = {k: np.mean(group[assigned == k] == "expert") > 0.5 for k in range(m)}
        in_expert = np.array([major[k] for k in assigned])
        crowd_with_experts.append(np.mean(in_expert[group == "crowd"]))
        experts_with_experts.append(np.mean(in_expert[group == "expert"]))
        gold = case.reference.astype(bool)
        main_map = res.labels.values.astype(bool)
        vote = case.raters.binary().mean(axis=0) >= 0.5
        dm = 2 * np.sum(main_map & gold) / (main_map.sum() + gold.sum())
        dv = 2 * np.sum(vote & gold) / (vote.sum() + gold.sum())
        dice_main.append(dm)
        dice_vote.append(dv)
        masks = case.raters.binary()
        i, j = names.index("expert/Person2_Amira"), names.index("expert/Person2_ImageJ")
        if np.array_equal(masks[i], masks[j]):
            twins.append(assigned[i] == assigned[j])
        print(f"| {im} | {m} | {stop} | {' '.join(cells)} | {a_g:.2f} | {a_t:.2f} | {kind} | {dm:.3f} | {dv:.3f} |", flush=True)
        counts.append(m)
        aris.append(a_g)
        tools_ari.append(a_t)
    values, freq = np.unique(counts, return_counts=True)
    print(f"\n{len(images)} images in {time.perf_counter() - t0:.0f} s; components found: "
          + ", ".join(f"{v}: {f} images" for v, f in zip(values, freq)))
    print(f"ARI (components vs expert/crowd): median {np.median(aris):.2f}, mean {np.mean(aris):.2f}, "
          f">= 0.5 on {int(np.sum(np.array(aris) >= 0.5))} images; every component of one group only on {pure} images")
    print(f"ARI (components vs tool Amira/ImageJ/crowd): median {np.median(tools_ari):.2f}, mean {np.mean(tools_ari):.2f}")
    print(f"share of crowd workers in an expert-majority component: mean {np.mean(crowd_with_experts):.2f}; "
          f"of experts: mean {np.mean(experts_with_experts):.2f}")
    print(f"Dice against the gold standard (= expert Person2_Amira's masks): main consensus median {np.median(dice_main):.3f}, "
          f"majority vote of all 17 raters median {np.median(dice_vote):.3f}")
    print(f"Person2_Amira and Person2_ImageJ identical on {len(twins)} images, in the same component on {int(np.sum(twins))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", choices=("bench", "bubil"), default="bench")
    p.add_argument("--shape", type=int, nargs=3, default=[180, 256, 256])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--images", nargs="+", help="BU-BIL images (default: all)")
    p.add_argument("--stop-rule", default="joins", choices=("joins", "joins+elbo"), help="bubil: the mixture's stop_rule")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        main_child(args)
    elif args.what == "bubil":
        main_bubil(args)
    else:
        main_bench(args)


if __name__ == "__main__":
    main()
