"""Per-voxel posterior summaries: exact formulas against brute force, known
limits, the dispatch by the result's schema, and the NIfTI files they become."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import stats
import xarray as xr

from bayesfuse import api, phantoms, summaries
from bayesfuse.cli import main
from bayesfuse.errors import ConfigError
from bayesfuse.models import REGISTRY


# ------------------------------------------------------------ exact formulas
@pytest.mark.parametrize("mass", [0.9, 0.8, 0.5])
def test_categorical_summaries_equal_bernoulli_draws(mass):
    """sd and quantiles of the label indicator against 400 000 Bernoulli draws."""
    rng = np.random.default_rng(1)
    lo_t, hi_t = (1 - mass) / 2, (1 + mass) / 2
    w = np.array([0.0, 0.01, 0.2, 0.5, 0.7, 0.99, 1.0])
    # keep clear of the two thresholds, where the empirical quantile of a
    # finite sample may fall on either side
    w = w[(np.abs(w - lo_t) > 0.01) & (np.abs(w - hi_t) > 0.01)]
    prob = np.stack([1 - w, w], axis=-1)
    s = summaries.categorical_summaries(prob, mass)
    n = 400_000
    draws = (rng.random((n, w.size)) < w).astype(float)
    np.testing.assert_allclose(s["consensus_sd"][:, 1], draws.std(axis=0), atol=3e-3)
    q = np.quantile(draws, [lo_t, hi_t], axis=0, method="inverted_cdf")
    np.testing.assert_array_equal(s["consensus_lo"][:, 1], q[0])
    np.testing.assert_array_equal(s["consensus_hi"][:, 1], q[1])
    inside = (draws >= s["consensus_lo"][:, 1]) & (draws <= s["consensus_hi"][:, 1])
    assert np.all(inside.mean(axis=0) >= mass - 3e-3)
    # the two classes' indicators are complements: 1[x=0] = 1 - 1[x=1]
    np.testing.assert_array_equal(s["consensus_lo"][:, 0], 1 - s["consensus_hi"][:, 1])


def test_categorical_interval_flips_exactly_at_the_thresholds():
    mass = 0.8
    eps = 1e-4
    w = np.array([0.1 - eps, 0.1 + eps, 0.9 - eps, 0.9 + eps])
    s = summaries.categorical_summaries(np.stack([1 - w, w], -1), mass)
    np.testing.assert_array_equal(s["consensus_hi"][:, 1], [0, 1, 1, 1])
    np.testing.assert_array_equal(s["consensus_lo"][:, 1], [0, 0, 0, 1])


def test_entropy_limits_and_scipy():
    k = 4
    one_hot = np.eye(k)
    assert np.all(summaries.entropy(one_hot) == 0)
    np.testing.assert_allclose(summaries.entropy(np.full((3, k), 1 / k)), np.log(k))
    p = np.random.default_rng(0).dirichlet(np.ones(k), size=50)
    np.testing.assert_allclose(summaries.entropy(p), stats.entropy(p, axis=-1), rtol=1e-12)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "x", None])
def test_mass_must_lie_in_the_open_unit_interval(bad):
    with pytest.raises(ConfigError, match="mass"):
        summaries.check_mass(bad)


# ----------------------------------------------------------------- dispatch
def test_rules_have_no_posterior_and_get_no_maps():
    ph = phantoms.make_phantom("simple", shape=(24, 24, 16), random_seed=0)
    r = api.fuse(ph.raters, "mean")
    assert summaries.posterior_kind(r) == "none"
    s = summaries.summarize(r)
    assert list(s.data_vars) == ["entropy"]
    fg = r.consensus.values.astype(np.float64)
    assert np.any((fg > 0) & (fg < 1))  # raters disagree somewhere
    np.testing.assert_allclose(s["entropy"].values, stats.entropy(np.stack([1 - fg, fg]), axis=0), atol=1e-6)
    assert summaries.attach(r) is r
    assert set(summaries.attach(r, rules=True).group("maps").data_vars) == {"entropy"}


@pytest.fixture(scope="module")
def pstaple_result():
    if "pstaple" not in REGISTRY:
        pytest.skip("pstaple has not landed")
    ph = phantoms.make_phantom("outlier", shape=(32, 32, 24), random_seed=3)
    return api.fuse(ph.raters, "pstaple")


def test_em_posterior_summaries_are_the_label_posterior(pstaple_result):
    r = pstaple_result
    assert summaries.posterior_kind(r) == "categorical"
    s = summaries.summarize(r, mass=0.8)
    w = r.consensus.values
    np.testing.assert_allclose(s["consensus_sd"].values, np.sqrt(w * (1 - w)), atol=1e-6)
    np.testing.assert_array_equal(s["consensus_lo"].values, (w > 0.9).astype(np.float32))
    np.testing.assert_array_equal(s["consensus_hi"].values, (w > 0.1).astype(np.float32))
    assert "consensus_mean" not in s  # the consensus is the posterior mean already
    for v in ("consensus_sd", "consensus_lo", "consensus_hi"):
        assert s[v].dims == ("x", "y", "z")
        assert s[v].attrs["mass"] == 0.8 and s[v].attrs["interval"] == "central (equal-tailed)"
        assert "label indicator" in s[v].attrs["quantity"]


def test_attach_then_save_writes_the_maps_with_their_interval(pstaple_result, tmp_path):
    r = summaries.attach(pstaple_result, mass=0.8)
    assert "maps" not in pstaple_result.tree.children  # the input is left alone
    written = {p.name for p in r.save(tmp_path)}
    assert {"consensus_sd.nii.gz", "consensus_lo.nii.gz", "consensus_hi.nii.gz", "entropy.nii.gz"} <= written
    img = nib.load(str(tmp_path / "consensus_hi.nii.gz"))
    assert b"90% quantile (central 80% interval)" in img.header["descrip"].tobytes()
    np.testing.assert_allclose(img.affine, pstaple_result.affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), r.group("maps")["consensus_hi"].values)
    assert summaries.interval_mass(r) == 0.8


def test_multiclass_summaries_carry_a_class_dim(tmp_path):
    if "pstaple" not in REGISTRY:
        pytest.skip("pstaple has not landed")
    ph = phantoms.make_phantom("multiclass", shape=(24, 24, 16), random_seed=0)
    r = summaries.attach(api.fuse(ph.raters, "pstaple"))
    maps = r.group("maps")
    assert maps["consensus_sd"].dims == ("x", "y", "z", "class") and maps.sizes["class"] == 3
    p = r.probability.values
    np.testing.assert_allclose(maps["consensus_sd"].values, np.sqrt(p * (1 - p)), atol=1e-6)
    np.testing.assert_allclose(maps["entropy"].values, stats.entropy(np.clip(p, 1e-30, 1), axis=-1), atol=1e-5)
    r.save(tmp_path)
    assert nib.load(str(tmp_path / "consensus_lo.nii.gz")).shape == (24, 24, 16, 3)


def _check_against_brute_force(r, s, link, n_voxels=12):
    """The summaries at voxels across the range of uncertainty against 200 000
    draws of F^-1(T~), T~ ~ N(mu_T[n], S_T[n]), with the interval of mass 0.8."""
    from bayesfuse.gaussian import link_space

    var = r.group("variational")
    sdims = r.spatial_dims
    mu = var["mu_T"].transpose(*sdims, ...).values
    cov = var["S_T"].transpose(*sdims, ...).values
    space = link_space(link, 2)
    rng = np.random.default_rng(7)
    sd_map = s["consensus_sd"].values
    order = np.argsort(sd_map.ravel())
    picks = order[np.linspace(order.size // 2, order.size - 1, n_voxels).astype(int)]
    assert sd_map.ravel()[picks[-1]] > 1e-3  # some voxels are really uncertain
    for flat in picks:
        v = np.unravel_index(flat, sd_map.shape)
        t = space.inverse(rng.multivariate_normal(mu[v], cov[v], size=200_000))[:, 1]
        lo, hi = np.quantile(t, [0.1, 0.9])
        tol = 0.04 * max(t.std(), 1e-4) + 1e-5
        assert abs(s["consensus_sd"].values[v] - t.std()) <= tol
        assert abs(s["consensus_lo"].values[v] - lo) <= 3 * tol and abs(s["consensus_hi"].values[v] - hi) <= 3 * tol
        mean = s["consensus_mean"].values[v] if "consensus_mean" in s else r.consensus.values[v]
        assert abs(mean - t.mean()) <= tol


def test_vb_summaries_are_those_of_q_in_probability_space():
    """robust-t's q(T~) (sqrt link, D = 2): summaries by brute force, and the
    model's own sd map (quadrature) agrees with the summaries' (Monte Carlo)."""
    if "robust-t" not in REGISTRY:
        pytest.skip("robust-t has not landed")
    ph = phantoms.make_phantom("outlier", shape=(24, 24, 16), random_seed=4)
    data = api.convert(ph.raters, "euclidean")
    r = api.fuse(data, "robust-t", max_iter=60)
    assert summaries.posterior_kind(r) == "gaussian"
    s = summaries.summarize(r, mass=0.8, random_seed=0)
    assert "link sqrt" in s["consensus_sd"].attrs["quantity"]
    _check_against_brute_force(r, s, "sqrt")
    np.testing.assert_allclose(s["consensus_sd"].values, r.group("maps")["consensus_sd"].values, atol=0.01)


def test_gaussian_dispatch_reads_the_schema_for_any_link():
    """A result holding only the schema's q(T~) (logit link, D = 1, mu_T with
    its coordinate first): the summaries follow mu_T, S_T and the link attr."""
    rng = np.random.default_rng(3)
    shape = (10, 9, 6)
    m = rng.normal(0, 2, size=shape)
    v = rng.gamma(2.0, 0.3, size=shape)
    from bayesfuse.data import RaterMaps
    from bayesfuse.gaussian import link_space
    from bayesfuse.result import FusionResult

    data = RaterMaps.from_arrays([rng.random(shape).astype(np.float32) for _ in range(3)], kind="probability")
    space = link_space("logit", 2)
    prob = space.inverse(m[..., None])
    var = xr.Dataset({"mu_T": (("coord", "x", "y", "z"), m[None]), "S_T": (("x", "y", "z", "coord", "coord2"), v[..., None, None])},
                     attrs={"link": "logit"})
    r = FusionResult.build(method="hand-made", data=data, config={}, probability=prob, variational=var)
    s = summaries.summarize(r, mass=0.8, random_seed=0)
    # D = 1: F^-1 is monotone, so the interval is exact: sigmoid(sqrt(2) (m +- z sd))
    z = stats.norm.ppf(0.9)
    exact_hi = space.inverse((m + z * np.sqrt(v))[..., None])[..., 1]
    exact_lo = space.inverse((m - z * np.sqrt(v))[..., None])[..., 1]
    np.testing.assert_allclose(s["consensus_hi"].values, exact_hi, atol=2e-3)
    np.testing.assert_allclose(s["consensus_lo"].values, exact_lo, atol=2e-3)
    _check_against_brute_force(r, s, "logit", n_voxels=8)


# ---------------------------------------------------------------------- CLI
def _nifti_raters(tmp_path, kind="simple"):
    ph = phantoms.make_phantom(kind, shape=(32, 32, 20), random_seed=2, spacing=(1.0, 1.0, 1.5))
    paths = []
    for i, m in enumerate(ph.raters.maps.values):
        p = tmp_path / f"r{i}.nii.gz"
        nib.save(nib.Nifti1Image(m, ph.raters.affine), str(p))
        paths.append(str(p))
    return paths


def test_cli_fuse_writes_summary_maps_with_chosen_mass(tmp_path):
    if "pstaple" not in REGISTRY:
        pytest.skip("pstaple has not landed")
    paths = _nifti_raters(tmp_path)
    out = tmp_path / "out"
    assert main(["fuse", "-m", "pstaple", "--out", str(out), "-q", "--interval-mass", "0.5", *paths]) == 0
    w = np.asarray(nib.load(str(out / "consensus.nii.gz")).dataobj)
    lo = np.asarray(nib.load(str(out / "consensus_lo.nii.gz")).dataobj)
    hi = np.asarray(nib.load(str(out / "consensus_hi.nii.gz")).dataobj)
    np.testing.assert_array_equal(lo, (w > 0.75).astype(np.float32))
    np.testing.assert_array_equal(hi, (w > 0.25).astype(np.float32))
    assert b"central 50% interval" in nib.load(str(out / "consensus_lo.nii.gz")).header["descrip"].tobytes()


def test_cli_refuses_a_bad_mass_before_writing(tmp_path, capsys):
    paths = _nifti_raters(tmp_path, "simple")
    out = tmp_path / "out"
    assert main(["fuse", "-m", "mean", "--out", str(out), "--interval-mass", "1.5", *paths]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interval mass" in err
    assert not out.exists()


# ------------------------------------------------------- posterior draws
def _with_draws():
    """Registered models whose module can draw from its posterior (as they land)."""
    out = []
    for name, spec in sorted(REGISTRY.items()):
        if spec.pymc and hasattr(spec.load(), "posterior_draws") and hasattr(spec.load(), "simulate"):
            out.append(name)
    return out


@pytest.mark.parametrize("method", _with_draws())
def test_posterior_draws_work_with_arviz(method):
    """result.posterior_draws gives a DataTree that ArviZ summarises as it is,
    and the draws agree with the point estimates of /raters."""
    import arviz as az

    spec = REGISTRY[method]
    config = spec.config()
    data, _ = spec.load().simulate(config, shape=(20, 20, 12), n_raters=4, random_seed=0)
    if spec.input == "probability" and data.kind != "probability":
        data = api.convert(data, "euclidean")
    r = api.fuse(data, method, random_seed=0)
    region = {"x": slice(8, 12), "y": slice(8, 12), "z": slice(5, 7)}
    try:
        tree = r.posterior_draws(n=400, region=region, random_seed=1)
    except NotImplementedError as exc:
        pytest.skip(f"{method}: {exc}")
    post = tree["posterior"].to_dataset()
    assert post.sizes["chain"] * post.sizes["draw"] == 400
    summ = az.summary(tree)
    hdi = az.hdi(tree, prob=0.9)
    raters = r.group("raters")
    checked = 0
    for v, da in post.data_vars.items():
        m = da.mean(("chain", "draw"))
        row = summ.loc[[i for i in summ.index if i == v or i.startswith(v + "[")], "mean"].astype(float).values
        # ArviZ's row order over the non-sample dims is its own: compare as sets
        np.testing.assert_allclose(np.sort(row), np.sort(m.values.ravel()), rtol=0.02, atol=1e-3)
        lo = hdi[v].sel(ci_bound="lower")
        hi = hdi[v].sel(ci_bound="upper")
        assert bool((lo <= hi).all())
        if v in raters and da.dims[2:] == raters[v].dims:
            sd = da.std(("chain", "draw"))
            gap = np.abs(m - raters[v]).values
            assert np.all(gap <= 4 * sd.values + 1e-3), f"{v}: draws' mean far from the point estimate"
            checked += 1
        # draws restricted to the region carry its spatial size
        for d, sl in region.items():
            if d in da.dims:
                assert da.sizes[d] == sl.stop - sl.start
                checked += 1
    assert checked > 0
    if summaries.posterior_kind(r) == "gaussian" and "T" in post:
        # the draws of T~ in the region, through F^-1, match the summaries' maps there
        from bayesfuse.gaussian import link_space
        from bayesfuse.summaries import _link_name

        t = post["T"].stack(s=("chain", "draw")).transpose("s", "x", "y", "z", ...).values
        p = link_space(_link_name(r), 2).inverse(t)[..., 1]
        summ_maps = summaries.summarize(r, mass=0.8).isel(region)
        sd = summ_maps["consensus_sd"].values
        np.testing.assert_allclose(p.std(axis=0), sd, rtol=0.2, atol=1e-4)
        np.testing.assert_allclose(np.quantile(p, 0.9, axis=0), summ_maps["consensus_hi"].values, atol=0.5 * sd.max() + 1e-4)
