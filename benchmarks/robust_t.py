"""Benchmark of the robust Student-t VB at full scale.

7 raters, 180 x 256 x 256 voxels, K = 2 (foreground probability maps, float32,
the raters' maps as a network or a conversion of masks would give them),
spatial prior on (Gaussian bases every 4 voxels). Printed, measured in the
same run:

- the floor: one read pass over the input (P x N float32), timed as a
  2-thread numba reduction and as numpy's single-thread ``sum``; the stricter
  (faster) of the two is the reference;
- seconds per VB iteration (median and max over the fit's iterations) and
  their ratio to the floor;
- the whole ``fit`` (input conversion, initialisation, iterations, outputs:
  consensus, sd map, tau maps, the result tree) in seconds;
- peak memory: the process's resident-set high-water mark while fitting
  (reset just before ``fit`` through ``/proc/self/clear_refs``), minus the
  resident set of the interpreter and libraries before the input existed,
  i.e. the input plus everything the fit needs, against the input's float32
  size (P x N x 4 bytes: a foreground map per rater, the form the input comes
  in; a P x N x K view would be twice that).

Run: ``/work/venv/bin/python benchmarks/robust_t.py [--shape 180 256 256] [--raters 7]``.
Numba kernels are compiled (or loaded from the cache) by a warm-up fit on a
small volume first, so the timed fit measures the solver, not the compiler.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import _memory  # benchmarks/ is sys.path[0] when run as a script
from _memory import status_kib


def rss_kib(field: str = "VmRSS") -> int:
    return status_kib(field)


def reset_peak() -> bool:
    """Reset the high-water mark; False where /proc/self/clear_refs is not writable."""
    try:
        _memory.reset_peak()
        return True
    except OSError:
        return False


def make_input(shape, n_raters, seed=0):
    """Smooth truth (two blobs), per-rater boundary offsets, smooth noise and one local outlier."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    z = np.linspace(-1, 1, nz, dtype=np.float32)[None, None, :]
    level = np.minimum(np.sqrt((x + 0.2) ** 2 + y**2 + z**2) - 0.45, np.sqrt((x - 0.4) ** 2 + (y - 0.3) ** 2 + (z + 0.2) ** 2) - 0.25)
    out = np.empty((n_raters,) + tuple(shape), dtype=np.float32)
    coarse = tuple(max(s // 16, 2) for s in shape)
    for p in range(n_raters):
        noise = ndimage.zoom(rng.normal(0, 0.03, coarse).astype(np.float32), [s / c for s, c in zip(shape, coarse)], order=1)
        d = level + np.float32(rng.normal(0, 0.02)) + noise[: nx, : ny, : nz]
        if p == 1:  # a local outlier: rater 1 marks a region the others leave out
            d = np.minimum(d, np.sqrt((x - 0.6) ** 2 + (y + 0.5) ** 2 + z**2) - 0.15)
        np.multiply(d, np.float32(-40.0), out=d)
        np.exp(d, out=d)
        out[p] = 1.0 / (1.0 + d)
        del d, noise
    return out


def read_pass_seconds(X: np.ndarray, repeat: int = 3) -> tuple[float, float, float]:
    """One read pass over X: wall (numba, 2 threads), wall and CPU (numpy sum, 1 thread), best of ``repeat``."""
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def _sum(a):
        flat = a.reshape(-1)
        n = flat.size
        nb = 64
        acc = np.zeros(nb)
        for b in prange(nb):
            s = 0.0
            for i in range(b * n // nb, (b + 1) * n // nb):
                s += flat[i]
            acc[b] = s
        return acc.sum()

    _sum(X[:1, :2])
    t_nb, t_np, c_np = [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        _sum(X)
        t_nb.append(time.perf_counter() - t)
        t, c = time.perf_counter(), time.process_time()
        X.sum(dtype=np.float64)
        t_np.append(time.perf_counter() - t)
        c_np.append(time.process_time() - c)
    return min(t_nb), min(t_np), min(c_np)


# ---------------------------------------------------------------- real data
def group_summary(res, groups: dict) -> dict:
    """Per rater group: mean over its raters of mean E[tau] on contested voxels, nu and sd."""
    r = res.raters
    out = {}
    for g in sorted(set(groups.values())):
        rows = [n for n in r.index if groups[n] == g]
        out[g] = {k: float(r.loc[rows, k].mean()) for k in ("mean_tau_contested", "mean_tau", "nu", "sd")}
    return out


def main_bubil(args) -> None:
    """Robust-t on BU-BIL images: experts' and crowd workers' reliability, paired over images."""
    from scipy import stats

    import bayesfuse
    from bayesfuse.datasets import bubil_case, bubil_images

    images = args.images or bubil_images()
    print(f"robust-t on BU-BIL ({args.to_prob} maps, max_iter {args.max_iter}); per image, mean over each group's raters")
    print("| image | iterations | converged | E[tau] contested: experts | crowd | nu: experts | crowd | sd: experts | crowd | Dice robust-t / gold | Dice vote / gold | s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for im in images:
        t = time.perf_counter()
        case = bubil_case(im)
        res = bayesfuse.fuse(case.raters, "robust-t", to_prob=args.to_prob, max_iter=args.max_iter, progress=False)
        g = group_summary(res, case.groups)
        gold = case.reference.astype(bool)
        lab = res.labels.values.astype(bool)
        vote = case.raters.binary().mean(axis=0) >= 0.5
        dice = lambda a: 2 * np.sum(a & gold) / (a.sum() + gold.sum())
        row = {"image": im, "iters": res.n_iter, "converged": bool(res.converged), "g": g, "dice": dice(lab), "dice_vote": dice(vote),
               "seconds": time.perf_counter() - t}
        rows.append(row)
        e, c = g["expert"], g["crowd"]
        print(f"| {im} | {row['iters']} | {'yes' if row['converged'] else 'no'} | {e['mean_tau_contested']:.3f} | {c['mean_tau_contested']:.3f} "
              f"| {e['nu']:.2f} | {c['nu']:.2f} | {e['sd']:.4f} | {c['sd']:.4f} | {row['dice']:.3f} | {row['dice_vote']:.3f} | {row['seconds']:.0f} |", flush=True)
    print()
    for key, label, lower_is_worse in (("mean_tau_contested", "mean E[tau] over contested voxels", True), ("nu", "nu", True), ("sd", "sd of the noise (sqrt(Tr Sigma_p / D))", False)):
        e = np.array([r["g"]["expert"][key] for r in rows])
        c = np.array([r["g"]["crowd"][key] for r in rows])
        # values within 1e-6 relative are ties (e.g. Sigma_p held at its floor for every rater)
        tied = np.isclose(e, c, rtol=1e-6, atol=0)
        crowd_worse = int(np.sum(((c < e) if lower_is_worse else (c > e)) & ~tied))
        line = (f"{label}: experts mean {e.mean():.4g} (median {np.median(e):.4g}), crowd mean {c.mean():.4g} (median {np.median(c):.4g}); "
                f"crowd worse on {crowd_worse} of {len(rows)} images, tied on {int(tied.sum())}")
        if len(rows) >= 2 and not tied.all():
            w = stats.wilcoxon(e, c)
            line += f"; Wilcoxon signed-rank (paired by image) p = {w.pvalue:.2g}"
        print(line)
    print(f"converged on {sum(r['converged'] for r in rows)} of {len(rows)} images; Dice against the gold standard (expert Person2's masks): "
          f"robust-t median {np.median([r['dice'] for r in rows]):.3f}, majority vote of all raters median {np.median([r['dice_vote'] for r in rows]):.3f}; "
          f"{sum(r['seconds'] for r in rows):.0f} s in all")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="?", choices=("bench", "bubil"), default="bench")
    ap.add_argument("--images", nargs="+", help="bubil: BU-BIL images (default: all 35)")
    ap.add_argument("--to-prob", default="euclidean", help="bubil: conversion of the masks to probability maps")
    ap.add_argument("--shape", type=int, nargs=3, default=[180, 256, 256])
    ap.add_argument("--raters", type=int, default=7)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--spacing", type=float, default=4.0, help="basis spacing in voxels")
    ap.add_argument("--min-variance", type=float, default=None, help="Config.min_variance (default: the model's)")
    args = ap.parse_args()
    if args.what == "bubil":
        main_bubil(args)
        return

    import numba

    from bayesfuse.data import RaterMaps
    from bayesfuse.models import robust_t as R

    cfg = R.Config(basis_spacing=args.spacing, min_variance=args.min_variance)
    # warm-up: compile (or load) the kernels on a small volume, with the
    # float32 storage the large volume gets
    small = make_input((24, 24, 24), args.raters, seed=1)
    R.fit(RaterMaps.from_arrays(list(small), kind="probability"), R.Config(basis_spacing=args.spacing, storage="float32"), max_iter=3, progress=False)
    del small

    base_kib = rss_kib()
    t = time.perf_counter()
    X = make_input(tuple(args.shape), args.raters)
    data = RaterMaps.from_arrays(X, kind="probability")
    del X
    t_make = time.perf_counter() - t
    X = data.maps.values
    input_bytes = X.size * 4
    t_nb, t_np, c_np = read_pass_seconds(X)
    floor = min(t_nb, t_np)
    before_kib = rss_kib()
    have_reset = reset_peak()
    t, c = time.perf_counter(), time.process_time()
    res = R.fit(data, cfg, max_iter=args.max_iter, tol=args.tol, progress=False)
    t_fit, c_fit = time.perf_counter() - t, time.process_time() - c
    peak_kib = rss_kib("VmHWM")
    iters = res.tree["optimizer"]["iteration_seconds"].values
    cpu_iters = res.tree["optimizer"]["iteration_cpu_seconds"].values

    n = int(np.prod(args.shape))
    print(f"robust-t benchmark: {args.raters} raters x {'x'.join(map(str, args.shape))} voxels ({n * args.raters / 1e6:.1f} M rater-voxels), K = 2, spatial prior (spacing {args.spacing:g} voxels)")
    print(f"machine: {os.cpu_count()} cores, numba {numba.__version__} with {numba.get_num_threads()} threads; load average at end {os.getloadavg()[0]:.1f}")
    print(f"input: {input_bytes / 2**20:.0f} MiB float32 (P x N foreground maps), made in {t_make:.1f} s")
    print(f"floor, one read pass: numba 2 threads {t_nb:.3f} s, numpy sum 1 thread {t_np:.3f} s (CPU {c_np:.3f} s) -> floor {floor:.3f} s")
    print(f"fit: {res.n_iter} iterations, converged={res.converged} ({res.tree['optimizer'].attrs['stop_reason']}), total {t_fit:.1f} s wall, {c_fit:.1f} s CPU (all threads)")
    if iters.size:
        med, worst = float(np.median(iters)), float(iters.max())
        cmed = float(np.median(cpu_iters))
        print(f"per iteration, wall: median {med:.3f} s ({med / floor:.1f} x floor), max {worst:.3f} s ({worst / floor:.1f} x floor), first {iters[0]:.3f} s")
        print(f"per iteration, CPU of all threads: median {cmed:.3f} s = {cmed / c_np:.1f} x the floor's CPU"
              f" (on 2 idle cores the wall ratio would be about half of that)")
        print(f"iterations in total {iters.sum():.1f} s; outside the iterations (input view, init, outputs) {t_fit - iters.sum():.1f} s")
    held = peak_kib - base_kib
    print(f"memory: RSS before input {base_kib / 2**10:.0f} MiB, before fit {before_kib / 2**10:.0f} MiB, peak during fit {peak_kib / 2**10:.0f} MiB"
          + ("" if have_reset else " (peak not reset: includes earlier work)"))
    print(f"memory held by input + fit at the peak: {held / 2**10:.0f} MiB = {held * 1024 / input_bytes:.2f} x the input's float32 size"
          f" (fit alone: {(peak_kib - before_kib) * 1024 / input_bytes:.2f} x)")
    print(f"nu: {np.round(res.raters['nu'].values, 2).tolist()}; mean E[tau]: {np.round(res.raters['mean_tau'].values, 3).tolist()}")
    opt = res.tree["optimizer"]
    if "relax_W" in opt:
        f = opt["relax_W"].values
        print(f"over-relaxation: omega {opt.attrs['relax']:g} for q(T~); (q(W), m) factor above 2 on {int(np.sum(f > 2))} of {f.size} iterations "
              f"(largest {f.max():g}), {opt.attrs['relax_W_refused']} refused; final ELBO {float(opt['objective'][-1]):.10g}")


if __name__ == "__main__":
    main()
