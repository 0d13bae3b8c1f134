# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Real data: a liver tumour, lung nodules, and cells drawn by experts and a crowd
#
# The other notebooks use data with a known truth. Here are real
# segmentations by several raters, from `../shared/data` beside the
# checkout (see its README; the data are not part of the package):
#
# 1. **liver tumour** (3-D CT, three radiologists): STAPLE, checked against
#    SimpleITK's, the effect of the field of view on STAPLE, and the robust
#    model's consensus, uncertainty and tau maps;
# 2. **LIDC lung nodules** (2-D crops, four radiologists): the source's
#    consensus is the majority vote; what STAPLE and the robust model add;
# 3. **BU-BIL cells** (ten expert and seven crowd masks per image): do the
#    models tell experts from crowd workers, and which fusion is closest to
#    the gold standard?
#
# Where the data are absent, the notebook says so and skips its
# computations (the test suite checks that it does so cleanly). Set
# `BAYESFUSE_SHARED_DATA` to the data folder if it lies elsewhere, and
# `BAYESFUSE_NOTEBOOK_SMALL=1` for small settings.

# %% tags=["parameters"]
import os

SMALL = os.environ.get("BAYESFUSE_NOTEBOOK_SMALL", "0") == "1"
LIVER_MARGIN = 6 if SMALL else 10     # voxels of background kept around the tumour
LIVER_ITER = 60 if SMALL else 400     # VB iterations allowed on the liver crop
N_LIDC = 2 if SMALL else 8            # nodule slices shown
BUBIL_IMAGE = "B01"
BUBIL_FACTOR = 8 if SMALL else 2      # BU-BIL images are 811 x 1024: block size of the downsampling

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import bayesfuse
from bayesfuse import datasets, metrics
from bayesfuse.data import RaterMaps
from bayesfuse.errors import InputError

try:
    DATA = datasets.shared_data_dir()
    print(f"real data found at {DATA}")
except InputError as err:
    DATA = None
    print(f"real data not found ({err}): this notebook skips its computations")

# %% [markdown]
# ## 1. The liver tumour (3-D)
#
# One CT volume (177 x 177 x 98 voxels of 1.73 mm) and three radiologists'
# tumour masks. First STAPLE on the whole volume, with ITK's stopping rule,
# next to ITK's own implementation (SimpleITK), which is what most users
# compare against.

# %%
if DATA is not None:
    liver = datasets.liver_tumor()
    masks = liver.raters.binary()                          # (3, x, y, z)
    names = [n.split("_")[-1].split(".")[0] for n in liver.raters.rater_names]
    voxel_ml = float(np.prod(liver.raters.spacing)) / 1000
    staple_whole = bayesfuse.fuse(liver.raters, "staple", criterion="theta", progress=False)
    print(staple_whole.raters[["sensitivity", "specificity"]].set_axis(names))
    try:
        import SimpleITK as sitk

        staple_filter = sitk.STAPLEImageFilter()
        itk = staple_filter.Execute([sitk.GetImageFromArray(m.astype(np.uint8)) for m in masks])
        itk_prob = sitk.GetArrayFromImage(itk)
        gap = np.abs(itk_prob - staple_whole.probability.values[..., 1]).max()
        print(f"SimpleITK STAPLE: sensitivities {np.round(staple_filter.GetSensitivity(), 6)}; "
              f"largest difference of the consensus maps {gap:.1e}")
        assert gap < 1e-4
        np.testing.assert_allclose(staple_filter.GetSensitivity(), staple_whole.raters["sensitivity"], atol=1e-6)
    except ImportError:
        print("SimpleITK is not installed (pip install bayesfuse[test]): no parity check")

# %% [markdown]
# The specificities are all above 0.9999: nearly every voxel of the volume
# is background that every radiologist left out. STAPLE's estimates depend on
# how much of that background it sees. Crop the volume to the tumour with a
# margin, or leave out the voxels on which all raters agree (NiftySeg's
# `-unc`, option `leave_out_unanimous`), and the same masks give other
# sensitivities and specificities.

# %%
if DATA is not None:
    where = np.nonzero(masks.any(axis=0))
    box = tuple(slice(max(int(i.min()) - LIVER_MARGIN, 0), int(i.max()) + LIVER_MARGIN + 1) for i in where)
    crop = RaterMaps.from_arrays([m[box] for m in masks], kind="binary", spacing=liver.raters.spacing,
                                 image=np.asarray(liver.raters.image)[box], names=names)
    staple_crop = bayesfuse.fuse(crop, "staple", progress=False)
    staple_unc = bayesfuse.fuse(liver.raters, "staple", leave_out_unanimous=True, progress=False)
    table = staple_whole.raters[["sensitivity", "specificity"]].set_axis(names).add_suffix(" (whole)")
    table = table.join(staple_crop.raters[["sensitivity", "specificity"]].add_suffix(" (crop)"))
    table = table.join(staple_unc.raters[["sensitivity", "specificity"]].set_axis(names).add_suffix(" (disagreement)"))
    print(f"crop {crop.shape}, {masks.sum(axis=(1, 2, 3)).tolist()} tumour voxels per radiologist")
    print(table.round(4).T)

# %% [markdown]
# The crop changes the specificities (less background), not the
# sensitivities. The last two rows are a warning: with only three raters,
# the voxels where they disagree carry six patterns (one or two of three
# votes), and STAPLE's eight parameters are barely identified on them. The
# fit lands on an implausible solution (a sensitivity near 0 for one
# radiologist). Leaving out the unanimous voxels needs more raters than
# this.

# %% [markdown]
# Now the robust model. The paper turns each binary mask into a probability
# map first (a sigmoid of the signed Euclidean distance to the mask's
# boundary: `to_prob="euclidean"`), then fuses in square-root link space.
# We run it on the crop; on the whole volume the command is
# `bayesfuse fuse --method robust-t --to-prob euclidean Patient01Homo_Rad0*.nii.gz -o out/`
# (about two minutes on two cores).

# %%
if DATA is not None:
    t0 = time.perf_counter()
    robust = bayesfuse.fuse(crop, "robust-t", to_prob="euclidean", max_iter=LIVER_ITER, progress=False)
    print(f"robust-t on {np.prod(crop.shape)} voxels: {time.perf_counter() - t0:.1f} s, {robust.n_iter} iterations, "
          f"converged: {robust.converged}")
    print(robust.raters[["nu", "mean_tau", "sd"]].round(3))
    volumes = {name: float(m.sum()) * voxel_ml for name, m in zip(names, masks)}
    volumes["STAPLE"] = float((staple_crop.labels.values > 0).sum()) * voxel_ml
    volumes["robust-t"] = float((robust.labels.values > 0).sum()) * voxel_ml
    print("volumes (mL):", {k: round(v, 2) for k, v in volumes.items()})
    assert min(volumes[n] for n in names) * 0.8 < volumes["robust-t"] < max(volumes[n] for n in names) * 1.2

# %%
if DATA is not None:
    areas = crop.binary().any(axis=0).sum(axis=(0, 1))
    z = int(np.argmax(areas))
    ct = np.asarray(crop.image)[:, :, z]
    fig, axes = plt.subplots(2, 4, figsize=(14, 7))
    axes[0, 0].imshow(ct.T, cmap="gray")
    for i, name in enumerate(names):
        axes[0, 0].contour(crop.binary()[i, :, :, z].T, levels=[0.5], colors=f"C{i}", linewidths=1)
    axes[0, 0].set_title("CT and the three radiologists")
    axes[0, 1].imshow(staple_crop.probability.values[:, :, z, 1].T, cmap="magma", vmin=0, vmax=1)
    axes[0, 1].set_title("STAPLE: p(tumour)")
    axes[0, 2].imshow(robust.probability.values[:, :, z, 1].T, cmap="magma", vmin=0, vmax=1)
    axes[0, 2].set_title("robust-t: consensus")
    im = axes[0, 3].imshow(robust.tree["maps"]["consensus_sd"].values[:, :, z].T, cmap="viridis")
    axes[0, 3].set_title("robust-t: posterior sd")
    plt.colorbar(im, ax=axes[0, 3], fraction=0.046)
    tau = robust.tree["maps"]["tau"].values
    for i, name in enumerate(names):
        im = axes[1, i].imshow(tau[i, :, :, z].T, cmap="viridis", vmin=0, vmax=np.quantile(tau, 0.99))
        axes[1, i].contour(crop.binary()[i, :, :, z].T, levels=[0.5], colors="w", linewidths=0.6)
        axes[1, i].set_title(f"E[tau] of {name}")
    plt.colorbar(im, ax=axes[1, 2], fraction=0.046)
    axes[1, 3].bar(list(volumes), list(volumes.values()), color=["C0", "C1", "C2", "0.3", "0.6"])
    axes[1, 3].set(ylabel="mL", title="tumour volume")
    for ax in axes.ravel()[:7]:
        ax.set_xticks([])
        ax.set_yticks([])
    plt.tight_layout()
    plt.show()

# %% [markdown]
# The consensus is uncertain along the tumour's border, where the
# radiologists' outlines differ, and each radiologist's $E[\tau]$ is low
# where that radiologist's own outline departs from the others'.
#
# Note the convergence flag printed above: on binary masks turned into
# sigmoid maps, most voxels are exact ties between the raters, and the
# robust model's ELBO can creep up for a hundred iterations or more (the
# whole volume with geodesic maps: 121 iterations at the default variance
# floor). The figures show the state after the iterations allowed;
# `models/robust_t.md`, "Ties and the variance floor", explains what the
# ties do to the model.
#
# ## 2. LIDC lung nodules (2-D)
#
# 64 x 64 crops of CT slices through lung nodules, each outlined by up to
# four radiologists. The source's consensus (`GT`) is their majority vote
# with ties going to the nodule: `bayesfuse`'s `majority-vote` reproduces it
# exactly (checked below). What do the probabilistic models add? A
# probability instead of a vote, and an uncertainty.
#
# We take slices that all four radiologists outlined. (Some LIDC slices have
# radiologists who drew nothing; two empty masks agree exactly with each
# other and with everyone on the background, and the robust model then
# trusts them and returns an empty consensus. Try one: that is a question
# about what the raters meant, not one the models can settle.)

# %%
if DATA is not None:
    ids = datasets.lidc_cases("test", min_raters=4)
    step = max(len(ids) // N_LIDC, 1)
    lidc = []
    for case_id in ids[::step] + ids:  # spread over the split; the rest if too few qualify
        if len(lidc) == N_LIDC:
            break
        case = datasets.lidc_case(case_id)
        if any(case.name == c.name for c, _, _ in lidc) or not case.raters.binary().reshape(4, -1).any(axis=1).all():
            continue  # taken already, or a radiologist drew nothing
        vote = bayesfuse.fuse(case.raters, "majority-vote", progress=False)
        assert np.array_equal(vote.labels.values > 0, case.reference > 0), case_id
        st = bayesfuse.fuse(case.raters, "staple", progress=False)
        rb = bayesfuse.fuse(case.raters, "robust-t", to_prob="euclidean", progress=False)
        lidc.append((case, st, rb))
        dice = [metrics.dice(m > 0, case.reference > 0) for m in case.raters.binary()]
        print(f"{case_id}: radiologists' Dice to the majority vote {np.round(dice, 2)}; "
              f"STAPLE {metrics.dice(st.labels.values > 0, case.reference > 0):.2f}, "
              f"robust-t {metrics.dice(rb.labels.values > 0, case.reference > 0):.2f}; "
              f"STAPLE sensitivities {np.round(st.raters['sensitivity'].values, 2)}")

# %%
if DATA is not None:
    fig, axes = plt.subplots(len(lidc), 4, figsize=(12, 3 * len(lidc)), squeeze=False)
    for row, (case, st, rb) in zip(axes, lidc):
        row[0].imshow(np.asarray(case.raters.image), cmap="gray")
        for i, m in enumerate(case.raters.binary()):
            row[0].contour(m, levels=[0.5], colors=f"C{i}", linewidths=1)
        row[0].set_title(case.name.split("/")[-1], fontsize=8)
        row[1].imshow(st.probability.values[..., 1], cmap="magma", vmin=0, vmax=1)
        row[1].set_title("STAPLE p(nodule)")
        row[2].imshow(rb.probability.values[..., 1], cmap="magma", vmin=0, vmax=1)
        row[2].contour(case.reference, levels=[0.5], colors="cyan", linewidths=0.7)
        row[2].set_title("robust-t, majority vote in cyan", fontsize=9)
        row[3].imshow(rb.tree["maps"]["consensus_sd"].values, cmap="viridis")
        row[3].set_title("robust-t posterior sd")
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    plt.tight_layout()
    plt.show()

# %% [markdown]
# With four raters the majority vote has ties (2 against 2) along the
# border; the source breaks them towards the nodule. STAPLE breaks them by
# the raters' estimated performance, and the robust model gives a graded
# probability with its uncertainty exactly there.
#
# ## 3. BU-BIL: experts and a crowd
#
# Phase-contrast images of cells; per image ten expert masks (five people,
# two tools) and seven masks by Mechanical Turk workers. The data set's
# gold standard equals one expert's masks (`Person2_Amira`), so that expert
# is left out when the gold standard is the reference
# (`exclude_gold_rater=True`). The images are downsampled for speed (block
# majority of the masks).

# %%
if DATA is not None:
    cell = datasets.bubil_case(BUBIL_IMAGE, exclude_gold_rater=True)
    small = cell.raters.downsample(BUBIL_FACTOR, how="majority")
    gold = RaterMaps.from_arrays([cell.reference.astype(np.uint8)] * 2).downsample(BUBIL_FACTOR, how="majority")
    gold = gold.binary()[0] > 0
    group = np.array([cell.groups[n] for n in small.rater_names])
    fused = {}
    for method, options in (("majority-vote", {}), ("staple", {}), ("robust-t", {"to_prob": "euclidean"})):
        t0 = time.perf_counter()
        fused[method] = bayesfuse.fuse(small, method, progress=False, **options)
        print(f"{method:<14} {time.perf_counter() - t0:5.1f} s   Dice to the gold standard "
              f"{metrics.dice(fused[method].labels.values > 0, gold):.3f}")
    experts_only = RaterMaps.from_arrays(list(small.binary()[group == "expert"]), kind="binary",
                                         names=[n for n, g in zip(small.rater_names, group) if g == "expert"])
    vote_experts = bayesfuse.fuse(experts_only, "majority-vote", progress=False)
    print(f"{'(experts only) majority-vote':<28} Dice {metrics.dice(vote_experts.labels.values > 0, gold):.3f}")

    st_raters, rb_raters = fused["staple"].raters, fused["robust-t"].raters
    by_group = {g: {"STAPLE sensitivity": st_raters["sensitivity"].values[group == g].mean(),
                    "STAPLE specificity": st_raters["specificity"].values[group == g].mean(),
                    "robust-t mean E[tau]": rb_raters["mean_tau"].values[group == g].mean(),
                    "robust-t nu": rb_raters["nu"].values[group == g].mean()} for g in ("expert", "crowd")}
    for g, row in by_group.items():
        print(f"{g:<7}", "  ".join(f"{k} {v:.3f}" for k, v in row.items()))

# %%
if DATA is not None:
    fig = plt.figure(figsize=(14, 4.2))
    ax0 = fig.add_subplot(1, 3, 1)
    ax0.imshow(np.asarray(small.image), cmap="gray")
    ax0.contour(gold, levels=[0.5], colors="w", linewidths=1)
    for method, colour in (("staple", "C1"), ("robust-t", "C2")):
        ax0.contour(fused[method].labels.values > 0, levels=[0.5], colors=colour, linewidths=0.8)
    ax0.set_title("gold (white), STAPLE (orange), robust-t (green)", fontsize=9)
    ax0.axis("off")
    colours = np.where(group == "expert", "C0", "C3")
    ax1 = fig.add_subplot(1, 3, 2)
    ax1.bar(np.arange(group.size), st_raters["sensitivity"].values, color=colours)
    ax1.set(title="STAPLE sensitivity (blue: expert, red: crowd)", xlabel="rater", ylim=(0.5, 1))
    ax2 = fig.add_subplot(1, 3, 3)
    ax2.bar(np.arange(group.size), rb_raters["mean_tau"].values, color=colours)
    ax2.set(title="robust-t mean E[tau] (local reliability)", xlabel="rater")
    plt.tight_layout()
    plt.show()

# %% [markdown]
# What the numbers say on this image (they are printed above; the full
# comparison over all images is `benchmarks/study.py`):
#
# - The crowd workers' masks are *larger*: STAPLE gives them a higher
#   sensitivity and a lower specificity than the experts, and its consensus
#   grows with them.
# - The robust model's mean $E[\tau]$ is lower for the crowd, but only a
#   little: with binary masks turned into sigmoid maps, most voxels are
#   exact ties (every rater 0 or 1), every rater's covariance sits at the
#   floor `min_variance` and every $\nu$ between about 1 and 2 (`models/robust_t.md`,
#   "Ties and the variance floor"). The separation of the two groups is
#   clearer in the mixture of consensuses
#   ([03_mixture_of_consensuses.py](03_mixture_of_consensuses.py)), which is
#   built for it.
