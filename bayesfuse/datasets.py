"""Loaders for the real multi-rater data sets of ``../shared/data``.

The data are not part of the package: these functions read them where they
lie (``root``, else the environment variable ``BAYESFUSE_SHARED_DATA``, else
``shared/data`` in the current folder or one of its parents) and handle each
set's quirks, so that tests, notebooks and the comparison study all read the
data the same way.

``liver-tumor``
    one CT volume, three radiologists' tumour masks (NIfTI, 3-D).
``lidc-crops``
    lung-nodule crops, 64 x 64, two to four radiologists per slice (TIFF);
    the source's consensus (``GT``) is the majority vote with ties to
    foreground.
``bu-bil-dataset1``
    cell images, ten expert and seven crowd-worker masks per image (PNG,
    object drawn black). The crowd workers' masks are crops of the image at
    unknown offsets: :func:`bubil_case` places each crop at the offset that
    maximises its overlap with the experts' majority vote (computed by FFT
    cross-correlation; the gold standard is never used for alignment), and
    reads pixels outside the crop as background.

    The data set's ``GoldStandard`` masks are identical to expert Person2's
    masks, drawn with either tool (``Person2_Amira`` and ``Person2_ImageJ``
    are the same masks), on all 35 images (Dice >= 0.999, checked with this
    module): scoring a fusion that includes Person2 against the gold standard
    rewards agreeing with one rater. Use
    ``bubil_case(..., exclude_gold_rater=True)`` when the gold standard is
    the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import RaterMaps
from .errors import InputError


def shared_data_dir(root: str | os.PathLike | None = None) -> Path:
    """Locate the shared data folder, or raise a clear error."""
    if root is not None:
        p = Path(root)
    elif os.environ.get("BAYESFUSE_SHARED_DATA"):
        p = Path(os.environ["BAYESFUSE_SHARED_DATA"])
    else:
        here = Path.cwd().resolve()
        p = next((d / "shared" / "data" for d in (here, *here.parents) if (d / "shared" / "data").is_dir()), here / "shared" / "data")
    if not p.is_dir():
        raise InputError(str(p), "shared data folder not found (pass root= or set BAYESFUSE_SHARED_DATA)")
    return p


@dataclass
class Case:
    """One case of a real data set: the raters, a reference, and rater groups."""

    name: str
    raters: RaterMaps
    reference: np.ndarray | None = None
    groups: dict[str, str] | None = None  # rater name -> group ("expert", "crowd", ...)


# ----------------------------------------------------------------- liver
def liver_tumor(root=None) -> Case:
    """The liver-tumour CT with its three radiologists' masks (3-D)."""
    from .io import load_raters

    d = shared_data_dir(root) / "liver-tumor"
    raters = sorted(d.glob("Patient01Homo_Rad0*.nii.gz"))
    data = load_raters(raters, image=d / "Patient01Homo.nii.gz")
    return Case("liver-tumor", data, None, {n: "radiologist" for n in data.rater_names})


# ------------------------------------------------------------------ LIDC
def lidc_cases(split: str = "test", root=None, min_raters: int = 2) -> list[str]:
    """Case ids (file stems) of one LIDC split with at least ``min_raters`` raters."""
    import tifffile

    d = shared_data_dir(root) / "lidc-crops" / split / "masks" / "annots"
    ids = []
    for f in sorted(d.glob("*.tif")):
        with tifffile.TiffFile(f) as t:
            shape = t.series[0].shape
        if shape[-1] >= min_raters:
            ids.append(f.stem)
    return ids


def lidc_case(case_id: str, split: str = "test", root=None) -> Case:
    """One LIDC crop: the radiologists' masks, the CT crop, the source's consensus."""
    import tifffile

    d = shared_data_dir(root) / "lidc-crops" / split
    annots = np.asarray(tifffile.imread(d / "masks" / "annots" / f"{case_id}.tif"))
    annots = annots.reshape(annots.shape[-3], annots.shape[-2], annots.shape[-1])
    scan = np.asarray(tifffile.imread(d / "scans" / f"{case_id}.tif")).reshape(annots.shape[:2])
    gt = np.asarray(tifffile.imread(d / "masks" / "GT" / f"{case_id}.tif")).reshape(annots.shape[:2])
    names = [f"radiologist{r}" for r in range(annots.shape[-1])]
    data = RaterMaps.from_arrays(
        [annots[..., r].astype(np.uint8) for r in range(annots.shape[-1])],
        kind="binary", image=scan.astype(np.float32), names=names,
        sources=[f"{case_id}.tif[{r}]" for r in range(annots.shape[-1])],
    )
    return Case(f"lidc/{split}/{case_id}", data, (gt > 0).astype(np.uint8), {n: "radiologist" for n in names})


# ---------------------------------------------------------------- BU-BIL
def _bubil_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return (np.asarray(im.convert("L")) < 128).astype(np.uint8)  # object drawn black


def _find_case_insensitive(folder: Path, name: str) -> Path | None:
    low = name.lower()
    return next((f for f in folder.iterdir() if f.name.lower() == low), None)


def bubil_images(root=None) -> list[str]:
    """Image ids of BU-BIL data set 1 (``"B01"`` ... ``"B35"``)."""
    d = shared_data_dir(root) / "bu-bil-dataset1" / "RawImages"
    return sorted(f.stem for f in d.glob("*.png"))


def align_crop(crop: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """Offset (row, col) placing ``crop`` inside ``target``'s frame with the
    largest overlap of foreground (FFT cross-correlation over valid offsets)."""
    from scipy.signal import fftconvolve

    if crop.shape[0] > target.shape[0] or crop.shape[1] > target.shape[1]:
        raise InputError("crop", f"shape {crop.shape} larger than the image {target.shape}")
    score = fftconvolve(target.astype(np.float32), crop[::-1, ::-1].astype(np.float32), mode="valid")
    i, j = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(i), int(j)


#: The expert folders whose masks the BU-BIL gold standard reproduces exactly
#: (one person, two annotation tools, identical masks).
BUBIL_GOLD_RATERS = ("Person2_Amira", "Person2_ImageJ")


def bubil_case(image_id: str, raters: str = "all", root=None, exclude_gold_rater: bool = False) -> Case:
    """One BU-BIL image: expert and/or crowd masks on the image's grid.

    Parameters
    ----------
    image_id : str
        ``"B01"`` ... ``"B35"``.
    raters : {"all", "experts", "crowd"}
        Which raters to return; groups are in ``Case.groups``.
    exclude_gold_rater : bool
        Leave out the expert whose masks are the gold standard
        (:data:`BUBIL_GOLD_RATERS`), so that the gold standard is a reference
        no fused rater equals.
    """
    from PIL import Image

    d = shared_data_dir(root) / "bu-bil-dataset1"
    raw_path = d / "RawImages" / f"{image_id}.png"
    if not raw_path.exists():
        raise InputError(str(raw_path), "no such BU-BIL image")
    with Image.open(raw_path) as im:
        image = np.asarray(im.convert("L"), dtype=np.float32)
    fname = f"seg_{image_id}.png"
    experts, expert_names = [], []
    for folder in sorted((d / "ExpertsAnnotations").iterdir()):
        f = _find_case_insensitive(folder, fname)
        if f is not None and not (exclude_gold_rater and folder.name in BUBIL_GOLD_RATERS):
            experts.append(_bubil_mask(f))
            expert_names.append(f"expert/{folder.name}")
    crowd, crowd_names = [], []
    if raters in ("all", "crowd"):
        mv = (np.sum(experts, axis=0) * 2 >= len(experts)).astype(np.uint8)
        for folder in sorted((d / "CrowdsourcedAnnotations").iterdir()):
            f = _find_case_insensitive(folder, fname)
            if f is None:
                continue
            m = _bubil_mask(f)
            if m.shape != image.shape:
                i, j = align_crop(m, mv)
                full = np.zeros(image.shape, np.uint8)
                full[i : i + m.shape[0], j : j + m.shape[1]] = m
                m = full
            crowd.append(m)
            crowd_names.append(f"crowd/{folder.name}")
    gold_path = _find_case_insensitive(d / "GoldStandard", fname)
    gold = _bubil_mask(gold_path) if gold_path is not None else None
    if raters == "experts":
        masks, names = experts, expert_names
    elif raters == "crowd":
        masks, names = crowd, crowd_names
    elif raters == "all":
        masks, names = experts + crowd, expert_names + crowd_names
    else:
        raise ValueError(f"raters must be 'all', 'experts' or 'crowd', not {raters!r}")
    data = RaterMaps.from_arrays(masks, kind="binary", image=image, names=names)
    groups = {n: n.split("/")[0] for n in names}
    return Case(f"bu-bil/{image_id}", data, gold, groups)


def _without_image_suffix(name: str) -> str:
    """A rater name without the suffix of an image file the project reads, if it has one."""
    from .io import _suffix
    from .manifest import READABLE_SUFFIXES

    suf = _suffix(Path(name))
    return name[: -len(suf)] if suf and suf in READABLE_SUFFIXES else name


def export_case(case: Case, out_dir: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write a case as NIfTI files for the command line: one file per rater,
    ``image.nii.gz``, ``reference.nii.gz`` and ``groups.csv``."""
    from .errors import OutputExistsError
    from .io import write_nifti, write_text_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = case.raters
    written = []
    # rater names read from files keep their suffix (Patient01Homo_Rad01.nii.gz): not twice
    planned = [out / (_without_image_suffix(n).replace("/", "__") + ".nii.gz") for n in data.rater_names]
    if not force:
        for p in planned:
            if p.exists():
                raise OutputExistsError(f"{p}: exists; use --force to overwrite")
    for p, arr in zip(planned, data.maps.values):
        written.append(write_nifti(p, arr, data.affine))
    if data.image is not None:
        written.append(write_nifti(out / "image.nii.gz", data.image.values, data.affine))
    if case.reference is not None:
        written.append(write_nifti(out / "reference.nii.gz", case.reference, data.affine))
    if case.groups:
        text = "rater,group\n" + "".join(f"{p.name},{case.groups[n]}\n" for p, n in zip(planned, data.rater_names))
        written.append(write_text_atomic(out / "groups.csv", text))
    return written


def load(dataset: str, case: str | None = None, root=None, **options) -> Case:
    """One case by data-set name: ``liver-tumor``, ``lidc`` (case id, ``split=``),
    ``bu-bil`` (image id, ``raters=``)."""
    if dataset in ("liver", "liver-tumor"):
        return liver_tumor(root)
    if dataset in ("lidc", "lidc-crops"):
        split = options.get("split", "test")
        return lidc_case(case or lidc_cases(split, root)[0], split, root)
    if dataset in ("bu-bil", "bubil", "bu-bil-dataset1"):
        return bubil_case(case or "B01", options.get("raters", "all"), root)
    raise ValueError(f"unknown data set {dataset!r}; choose liver-tumor, lidc or bu-bil")
