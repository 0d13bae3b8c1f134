"""The robust-fusion paper's claims (seed 000, section 4.2) reproduced on phantoms.

Phantoms have a known truth (``bayesfuse.phantoms``). The binary raters are
converted to probabilities with the Euclidean log-odds maps of the paper's
section 2.1 before the continuous models see them; STAPLE fuses the binary
masks themselves, as in the paper's comparison. Two claims do not reproduce
here; they are kept as strict expected failures with the measured numbers,
so that the suite says so and notices if that changes.
"""

from __future__ import annotations

import numpy as np
import pytest

import bayesfuse
from bayesfuse import metrics, phantoms, preprocess
from bayesfuse.data import RaterMaps

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def outlier_runs():
    runs = []
    for seed in SEEDS:
        ph = phantoms.make_phantom("outlier", ndim=2, shape=(96, 96), n_raters=5, random_seed=seed)
        d = preprocess.to_probability(ph.raters, "euclidean")
        fits = {m: bayesfuse.fuse(d, m, progress=False) for m in ("robust-t", "gaussian", "continuous-staple")}
        fits["staple"] = bayesfuse.fuse(ph.raters, "staple", progress=False)
        dice = {m: metrics.dice(ph.truth, r.consensus.values > 0.5) for m, r in fits.items()}
        runs.append((ph, fits, dice))
    return runs


def test_outlier_rater_has_lower_tau_in_its_outlier_region(outlier_runs):
    for ph, fits, _ in outlier_runs:
        tau = fits["robust-t"].tree["maps"]["tau"].values
        region = ph.outlier_region
        ratio = np.array([tau[p][region].mean() / tau[p][~region].mean() for p in range(ph.n_raters)])
        q = ph.params["outlier_rater"]
        others = np.delete(ratio, q)
        # measured: 0.08-0.15 for the outlier rater, 0.56-0.97 for the others (variance floor 1e-3;
        # 0.03-0.10 and 0.39-0.86 at the floor of 1e-4, the default until 2026-12)
        assert ratio[q] < 0.25
        assert ratio[q] < 0.5 * others.min()


def test_student_t_consensus_beats_the_gaussian_ones(outlier_runs):
    dice = np.array([[d["robust-t"], d["gaussian"], d["continuous-staple"]] for _, _, d in outlier_runs])
    # measured (seeds 0-2): robust-t 0.968 0.971 0.969, gaussian 0.961 0.968 0.960, continuous
    # STAPLE 0.959 0.963 0.967 (at the variance floor of 1e-4, the default until 2026-12:
    # robust-t 0.971 0.968 0.969, gaussian 0.957 0.954 0.947, continuous STAPLE 0.957 0.954
    # 0.958; the larger floor helps the Gaussian models more)
    assert np.all(dice[:, 0] > dice[:, 1])
    assert dice[:, 0].mean() > dice[:, 1].mean() + 0.005
    assert dice[:, 0].mean() > dice[:, 2].mean() + 0.005


@pytest.mark.xfail(strict=True, reason=(
    "not reproduced: on the outlier phantoms (Euclidean maps for robust-t, binary masks for STAPLE) the "
    "mean Dice over seeds 0-2 is 0.9690 for robust-t (0.968/0.971/0.969) and 0.9684 for STAPLE (0.976/0.957/0.972): "
    "ahead by 0.0006, not by the 0.005 asked (0.9693 at the variance floor of 1e-4, the default until 2026-12); "
    "one outlier among five raters does not move STAPLE's majority"
))
def test_student_t_consensus_beats_staple(outlier_runs):
    t = np.mean([d["robust-t"] for _, _, d in outlier_runs])
    s = np.mean([d["staple"] for _, _, d in outlier_runs])
    assert t > s + 0.005


def _roughness(p: np.ndarray) -> float:
    g = np.gradient(p.astype(float))
    return float(np.mean(sum(gi**2 for gi in g)))


@pytest.fixture(scope="module")
def noisy_raters():
    ph = phantoms.make_phantom("probability", ndim=2, shape=(96, 96), n_raters=5, random_seed=0)
    rng = np.random.default_rng(0)
    fg = ph.raters.foreground()
    noisy = np.clip(fg + rng.normal(0, 0.15, fg.shape), 0, 1).astype(np.float32)
    return RaterMaps.from_arrays(list(noisy), kind="probability")


def test_larger_basis_spacing_gives_a_smoother_consensus(noisy_raters):
    rough = [
        _roughness(bayesfuse.fuse(noisy_raters, "robust-t", progress=False, basis_spacing=s).consensus.values)
        for s in (2.0, 4.0, 8.0)
    ]
    # measured: 0.00339, 0.00280, 0.00271 (Sigma_T estimated)
    assert rough[0] > rough[1] > rough[2]


def test_larger_basis_width_gives_a_smoother_consensus(noisy_raters):
    rough = [
        _roughness(bayesfuse.fuse(noisy_raters, "robust-t", progress=False, basis_spacing=4.0, basis_width=w, sigma_T=1e-3).consensus.values)
        for w in (2.0, 4.0, 8.0)
    ]
    assert rough[0] > rough[1] > rough[2]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "not reproduced for robust-t: with geodesic maps its consensus lies further from the truth than with "
    "Euclidean maps (mean surface distance 1.18 vs 1.04, 0.90 vs 0.82, 0.91 vs 0.88, 1.12 vs 1.03 mm on "
    "seeds 0-3, four raters with 2 mm boundary noise), while the plain mean of the same maps does gain "
    "(0.656 vs 0.666 ...: see bayesfuse/preprocess.py)"
))
def test_geodesic_maps_beat_euclidean_near_intensity_edges():
    gain = []
    for seed in (0, 1):
        ph = phantoms.make_phantom("simple", ndim=2, shape=(96, 96), n_raters=4, random_seed=seed, noise_mm=2.0)
        msd = {}
        for conv in ("euclidean", "geodesic"):
            r = bayesfuse.fuse(preprocess.to_probability(ph.raters, conv), "robust-t", progress=False)
            msd[conv] = metrics.mean_surface_distance(ph.truth, r.consensus.values > 0.5)
        gain.append(msd["euclidean"] - msd["geodesic"])
    assert np.mean(gain) > 0
