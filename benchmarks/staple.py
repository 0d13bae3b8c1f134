"""Benchmark of the STAPLE family at full scale, against SimpleITK in the same run.

Input: ``make_phantom("simple")``, 7 binary raters of 180 x 256 x 256 voxels
(seed 0), and from the same raters

- soft masks by the paper's protocol (``preprocess.soft_dilation`` on the
  phantom's image, gamma = 0.3: levels 0, 0.3, 1), and
- continuous maps (``preprocess.euclidean_probability``: a sigmoid of the
  signed distance, every voxel soft).

Cases, each in its own process (so that its memory is its own):

``floor-binary`` / ``floor-float``
    one read pass over the input (``np.count_nonzero`` over the uint8 masks,
    ``np.sum`` over the float32 maps): the memory-bandwidth floor.
``sitk``
    SimpleITK's ``STAPLEImageFilter`` (foreground 1, defaults) on the masks.
``staple``
    bayesfuse's STAPLE configured like ITK (``criterion="theta"``: ITK's
    stopping rule; ITK's start and prior are the defaults).
``soft-quantised`` / ``simplified-quantised``
    exact / simplified soft-STAPLE on the soft masks.
``soft-continuous`` / ``simplified-continuous``
    exact / simplified soft-STAPLE on the continuous maps.

Each timing is the whole call a user makes (``fit``: reading the maps,
compression, EM, consensus, the result tree), best of
``--repeat`` runs; numba kernels are compiled or loaded from their cache by a
warm-up fit on a small volume first. Peak memory: the process's resident-set
high-water mark during the call (reset through ``/proc/self/clear_refs``
just before it) minus the resident set before the input was loaded, i.e. the
input plus everything the call needs, against the input's size in memory
(uint8 masks: P x N bytes; float32 maps: 4 P x N bytes). For SimpleITK the
input is its 7 ITK images (made before the reset, also counted).

Run: ``/work/venv/bin/python benchmarks/staple.py [--shape 180 256 256] [--raters 7] [--repeat 3]``.
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

CASES = ("floor-binary", "floor-float", "sitk", "staple", "soft-quantised", "simplified-quantised",
         "soft-continuous", "simplified-continuous")


# --------------------------------------------------------------------------
# parent: make the inputs once, run every case in a child, print the table
def make_inputs(folder: Path, shape, n_raters: int, cases) -> dict:
    from bayesfuse import phantoms, preprocess

    out = {}
    t0 = time.perf_counter()
    ph = phantoms.make_phantom("simple", shape=tuple(shape), n_raters=n_raters, random_seed=0)
    masks = ph.raters.binary()
    np.save(folder / "masks.npy", masks)
    out["phantom"] = f"phantom {time.perf_counter() - t0:.1f} s"
    image = ph.raters.image.values
    if any(c.endswith("quantised") for c in cases):
        t0 = time.perf_counter()
        soft = np.stack([preprocess.soft_dilation(m, image, ph.raters.spacing, gamma=0.3) for m in masks])
        out["soft"] = f"soft dilation {time.perf_counter() - t0:.1f} s ({np.unique(soft).size} levels)"
        np.save(folder / "soft.npy", soft)
        del soft
    if any(c.endswith("continuous") or c == "floor-float" for c in cases):
        t0 = time.perf_counter()
        cont = np.stack([preprocess.euclidean_probability(m, ph.raters.spacing) for m in masks])
        out["continuous"] = (f"euclidean maps {time.perf_counter() - t0:.1f} s "
                             f"({np.unique(cont[:, ::4, ::4, ::4]).size} distinct values in a 1/64 sample)")
        np.save(folder / "continuous.npy", cont)
    return out


def run_case(case: str, folder: Path, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--data", str(folder), "--repeat", str(repeat)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_parent(args) -> None:
    import platform

    cases = args.cases or CASES
    with tempfile.TemporaryDirectory(prefix="bayesfuse-staple-bench-") as tmp:
        folder = Path(tmp)
        prep = make_inputs(folder, args.shape, args.raters, cases)
        res = {c: run_case(c, folder, args.repeat) for c in cases}
        parity = None
        if "sitk" in res and "staple" in res:
            w_sitk = np.load(folder / "sitk_consensus.npy")
            w_ours = np.load(folder / "staple_consensus.npy")
            parity = {
                "consensus": float(np.max(np.abs(w_sitk - w_ours))),
                "sensitivity": float(np.max(np.abs(np.subtract(res["sitk"]["sensitivity"], res["staple"]["sensitivity"])))),
                "specificity": float(np.max(np.abs(np.subtract(res["sitk"]["specificity"], res["staple"]["specificity"])))),
            }
    n = int(np.prod(args.shape))
    print(f"# STAPLE family benchmark: {args.raters} raters x {'x'.join(map(str, args.shape))} = {n} voxels; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; Python {platform.python_version()}")
    print("# inputs: " + "; ".join(prep.values()))
    print("| case | seconds | iterations | patterns | vs read pass | peak memory / input |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in cases:
        r = res[c]
        floor = res.get("floor-binary" if c in ("sitk", "staple", "floor-binary") else "floor-float", {}).get("seconds")
        mem = f"{r['peak_over_input']:.2f}" if "peak_over_input" in r else ""
        ratio = f"{r['seconds'] / floor:.0f} x" if floor else ""
        print(f"| {c} | {r['seconds']:.3f} | {r.get('iterations', '')} | {r.get('patterns', '')} | {ratio} | {mem} |")
    t = {c: res[c]["seconds"] for c in cases}
    if "sitk" in t and "staple" in t:
        print(f"SimpleITK / bayesfuse STAPLE time: {t['sitk'] / t['staple']:.1f} x (must be >= 10)")
    if parity:
        print(f"parity with SimpleITK: max |consensus diff| {parity['consensus']:.2e}, sensitivity {parity['sensitivity']:.2e}, "
              f"specificity {parity['specificity']:.2e} (must be <= 1e-4)")
    if "soft-quantised" in t and "staple" in t:
        print(f"soft-STAPLE on quantised soft masks / binary STAPLE time: {t['soft-quantised'] / t['staple']:.2f} x (must be <= 2)")
    if "soft-continuous" in t:
        print(f"exact soft-STAPLE on continuous maps: {t['soft-continuous']:.1f} s (must be <= 30)")
    mems = [res[c]["peak_over_input"] for c in cases if "peak_over_input" in res[c] and c != "sitk"]
    if mems:
        print(f"largest peak memory / input over bayesfuse's cases: {max(mems):.2f} (must be <= 3)"
              + (f"; SimpleITK: {res['sitk']['peak_over_input']:.2f}" if "sitk" in res else ""))


# --------------------------------------------------------------------------
# child: one case
def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel on a small volume."""
    import bayesfuse
    from bayesfuse.data import RaterMaps

    rng = np.random.default_rng(0)
    m = (rng.random((3, 12, 12, 8)) < 0.4).astype(np.uint8)
    bayesfuse.fuse(RaterMaps.from_arrays(list(m)), "staple", progress=False)
    for values in (np.where(m == 1, 1.0, np.where(rng.random(m.shape) < 0.3, 0.3, 0.0)), rng.random(m.shape)):
        d = RaterMaps.from_arrays(list(values.astype(np.float32)), kind="probability")
        bayesfuse.fuse(d, "soft-staple", progress=False)
        bayesfuse.fuse(d, "soft-staple-simplified", progress=False)


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeat):
        # the previous run's result must not count in this run's memory (a
        # DataTree holds reference cycles: only the cyclic collector frees it)
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main_child(args) -> None:
    case, folder = args.case, Path(args.data)
    import bayesfuse
    from bayesfuse.data import RaterMaps

    warm_up()
    base = status_kib("VmRSS")
    out: dict = {"case": case}
    if case in ("floor-binary", "sitk", "staple"):
        arr = np.load(folder / "masks.npy")
    elif case.endswith("quantised"):
        arr = np.load(folder / "soft.npy")
    else:
        arr = np.load(folder / "continuous.npy")
    input_kib = arr.nbytes / 1024

    if case.startswith("floor"):
        fn = (lambda: np.count_nonzero(arr)) if arr.dtype == np.uint8 else (lambda: arr.sum())
        out["seconds"], _ = timed(fn, 5)
        print(json.dumps(out))
        return

    if case == "sitk":
        import SimpleITK as sitk

        images = [sitk.GetImageFromArray(m) for m in arr]
        del arr

        def run():
            f = sitk.STAPLEImageFilter()
            f.SetForegroundValue(1)
            return f, f.Execute(images)

        reset_peak()
        out["seconds"], (f, img) = timed(run, max(1, args.repeat - 1))
        out["peak_over_input"] = (status_kib("VmHWM") - base) / input_kib
        out["iterations"] = int(f.GetElapsedIterations()) + 1
        out["sensitivity"], out["specificity"] = list(f.GetSensitivity()), list(f.GetSpecificity())
        np.save(folder / "sitk_consensus.npy", sitk.GetArrayFromImage(img).astype(np.float32))
        print(json.dumps(out))
        return

    kind = "binary" if case == "staple" else "probability"
    data = RaterMaps.from_arrays(arr, kind=kind)
    del arr
    method = {"staple": "staple", "soft-quantised": "soft-staple", "soft-continuous": "soft-staple",
              "simplified-quantised": "soft-staple-simplified", "simplified-continuous": "soft-staple-simplified"}[case]
    options = {"criterion": "theta"} if case == "staple" else {}
    reset_peak()
    out["seconds"], res = timed(lambda: bayesfuse.fuse(data, method, progress=False, **options), args.repeat)
    out["peak_over_input"] = (status_kib("VmHWM") - base) / input_kib
    out["iterations"] = res.n_iter
    out["patterns"] = res.tree.attrs.get("n_patterns", "")
    out["sensitivity"] = res.raters["sensitivity"].tolist()
    out["specificity"] = res.raters["specificity"].tolist()
    if case == "staple":
        np.save(folder / "staple_consensus.npy", res.consensus.values)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[180, 256, 256])
    p.add_argument("--raters", type=int, default=7)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", nargs="+", choices=CASES, help="run only these cases (default: all)")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        main_child(args)
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
