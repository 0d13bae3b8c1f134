"""Reading raters' maps from files and writing results, safely.

Formats:

- NIfTI (``.nii``, ``.nii.gz``) through nibabel: a list of rater files (3-D,
  or 4-D with classes last for K-class probability maps), or one 4-D file
  whose last axis is the rater;
- 2-D images: PNG/JPEG/BMP (Pillow, converted to grey) and TIFF (tifffile).
  A single TIFF holding several masks (e.g. 1 x 64 x 64 x R) gives one rater
  per entry of its last axis.

Every problem is raised as :class:`bayesfuse.errors.InputError` naming the
file. Writes are atomic: a temporary file in the target folder, then
:func:`os.replace`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import RaterMaps
from .errors import InputError, OutputExistsError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TIFF_SUFFIXES = (".tif", ".tiff")

#: Largest difference (mm) tolerated between two files' affines. Files written
#: by different tools often differ in the last float32 digit.
AFFINE_TOL = 1e-3


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _umask_mode() -> int:
    """Mode 0666 minus the umask: what a plainly created file would get."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def file_checksum(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_image(path: str | os.PathLike, invert: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one file into an array, with its affine when the format has one.

    Parameters
    ----------
    path : path
        A NIfTI, PNG/JPEG/BMP or TIFF file.
    invert : bool
        For 8-bit 2-D images: read the DARK pixels as foreground
        (value < 128 -> 1, else 0), as in data sets that draw the object black.

    Returns
    -------
    array, affine or None
    """
    p = Path(path)
    if not p.exists():
        raise InputError(str(path), "no such file")
    if p.is_dir():
        raise InputError(str(path), "is a folder, not an image file")
    suf = _suffix(p)
    try:
        if suf in NIFTI_SUFFIXES:
            import nibabel as nib

            img = nib.load(str(p))
            arr = np.asanyarray(img.dataobj)
            aff = np.asarray(img.affine, dtype=float)
        elif suf in TIFF_SUFFIXES:
            import tifffile

            arr = np.asarray(tifffile.imread(str(p)))
            aff = None
        elif suf in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(str(p)) as im:
                arr = np.asarray(im.convert("L"))
            aff = None
        else:
            raise InputError(str(path), f"unknown file type {suf!r} (use NIfTI .nii/.nii.gz, PNG or TIFF)")
    except InputError:
        raise
    except Exception as exc:  # nibabel, zlib, Pillow and tifffile raise many kinds
        raise InputError(str(path), f"cannot be read ({type(exc).__name__}: {exc}); is it truncated or not an image?") from None
    if invert:
        if arr.dtype == bool:
            arr = ~arr
        else:
            arr = arr < 128
        arr = arr.astype(np.uint8)
    if aff is None:
        # 2-D images carry no geometry: the convention is 1 mm pixels.
        arr = np.squeeze(arr) if arr.ndim > 2 and 1 in arr.shape[:1] else arr
    return arr, aff


def _affines_agree(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=AFFINE_TOL, rtol=0))


def _fmt_affine_diff(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a - b)
    i, j = np.unravel_index(np.argmax(d), d.shape)
    return f"affine differs (entry [{i},{j}]: {a[i, j]:.6g} vs {b[i, j]:.6g})"


def load_raters(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    image: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    kind=None,
    n_classes: int | None = None,
    invert: bool = False,
    spacing: Sequence[float] | None = None,
    min_raters: int = 2,
) -> RaterMaps:
    """Build a :class:`~bayesfuse.data.RaterMaps` from files.

    Parameters
    ----------
    paths : path or sequence of paths
        One file per rater, or a single file holding all raters on its last
        axis (a 4-D NIfTI, or a TIFF stack of 2-D masks).
    image : path, optional
        Intensity image on the same grid (used by geodesic conversion, soft
        masks and reports).
    mask : path, optional
        Region of interest (0/1).
    kind, n_classes : optional
        Declare the maps' kind and K (see :meth:`RaterMaps.from_arrays`).
    invert : bool
        2-D masks drawn dark on light: read value < 128 as foreground.
    spacing : sequence of float, optional
        Voxel size (mm) for formats without geometry (PNG, TIFF). NIfTI files
        carry their own.
    min_raters : int
        Refuse fewer raters than this.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("raters", "no rater files given")

    arrays: list[np.ndarray] = []
    names: list[str] = []
    sources: list[str] = []
    checksums: dict[str, str] = {}
    ref_aff = None
    ref_src = None
    for p in paths:
        src = str(p)  # the path as the user gave it, for messages
        arr, aff = read_image(p, invert=invert)
        checksums[p.name] = file_checksum(p)
        if aff is not None:
            if ref_aff is None:
                ref_aff, ref_src = aff, src
            elif not _affines_agree(aff, ref_aff):
                raise InputError(src, f"{_fmt_affine_diff(aff, ref_aff)} from {ref_src}'s; the raters must share one grid")
        if len(paths) == 1:
            # One file holds every rater on its last axis.
            is_nifti = _suffix(p) in NIFTI_SUFFIXES
            if (is_nifti and arr.ndim == 4) or (not is_nifti and arr.ndim == 3):
                for r in range(arr.shape[-1]):
                    arrays.append(np.ascontiguousarray(arr[..., r]))
                    names.append(f"{p.name}[{r}]")
                    sources.append(f"{src}[{r}]")
                continue
        arrays.append(arr)
        names.append(p.name)
        sources.append(src)

    if len(set(names)) != len(names):
        # Same file name in different folders (e.g. <rater>/seg_B01.png): the
        # rater is named by its folder and file.
        names = [f"{p.parent.name}/{p.name}" for p in paths]
        if len(set(names)) != len(names):
            names = [str(p) for p in paths]

    img_arr = None
    if image is not None:
        img_arr, img_aff = read_image(image)
        checksums[f"image:{Path(image).name}"] = file_checksum(image)
        img_arr = img_arr.astype(np.float32)
        if img_aff is not None and ref_aff is not None and not _affines_agree(img_aff, ref_aff):
            raise InputError(str(image), f"{_fmt_affine_diff(img_aff, ref_aff)} from {ref_src}'s; the image must share the raters' grid")
        if img_arr.shape != arrays[0].shape[: img_arr.ndim] or img_arr.ndim not in (2, 3):
            raise InputError(str(image), f"shape {img_arr.shape} differs from the raters' {arrays[0].shape}")
    mask_arr = None
    if mask is not None:
        mask_arr, m_aff = read_image(mask)
        checksums[f"mask:{Path(mask).name}"] = file_checksum(mask)
        if m_aff is not None and ref_aff is not None and not _affines_agree(m_aff, ref_aff):
            raise InputError(str(mask), f"{_fmt_affine_diff(m_aff, ref_aff)} from {ref_src}'s; the mask must share the raters' grid")

    try:
        # NIfTI files carry their geometry; other formats take ``spacing``
        # (default 1 mm), from which RaterMaps derives a diagonal affine.
        return RaterMaps.from_arrays(
            arrays,
            kind=kind,
            n_classes=n_classes,
            affine=ref_aff,
            spacing=None if ref_aff is not None else spacing,
            image=img_arr,
            mask=mask_arr,
            names=names,
            sources=sources,
            checksums=checksums,
            min_raters=min_raters,
        )
    except InputError as e:
        # The mask is validated inside from_arrays as "mask": name the file.
        if e.source == "mask" and mask is not None:
            raise InputError(str(mask), e.problem) from None
        if e.source == "image" and image is not None:
            raise InputError(str(image), e.problem) from None
        raise


# --------------------------------------------------------------------- write
def _nifti_dtype(arr: np.ndarray):
    if arr.dtype == bool:
        return np.uint8
    if np.issubdtype(arr.dtype, np.integer):
        return np.uint8 if arr.size == 0 or (arr.min() >= 0 and arr.max() < 256) else np.int32
    return np.float32


def write_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    description: str = "bayesfuse",
    spatial_ndim: int | None = None,
    force: bool = True,
) -> Path:
    """Write an array as NIfTI with the given affine, atomically.

    The data go to a temporary file in the same folder, which is renamed over
    ``path`` only once complete. Floats are stored as float32 with
    ``cal_min``/``cal_max`` set to their range; integers as uint8 where they fit.
    A 2-D image with one extra axis (e.g. raters) is written as x, y, 1, extra.

    Parameters
    ----------
    spatial_ndim : int, optional
        Number of spatial axes of ``array`` (default: all, up to 3). A 2-D
        image with an extra axis gets a singleton z so that viewers read the
        extra axis as the fourth (volume) dim.
    force : bool
        Overwrite an existing file (the default here; the CLI checks first).
    """
    import nibabel as nib

    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: exists; use --force to overwrite")
    arr = np.asarray(array)
    dtype = _nifti_dtype(arr)
    arr = arr.astype(dtype, copy=False)
    if spatial_ndim == 2 and arr.ndim == 3:
        arr = arr[:, :, None, :]
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=float))
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr["descrip"] = description[:79].encode()
    if np.issubdtype(dtype, np.floating) and arr.size:
        hdr["cal_min"] = float(np.min(arr))
        hdr["cal_max"] = float(np.max(arr))
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temporary file, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_outputs(out_dir: str | os.PathLike, names: Sequence[str], force: bool) -> Path:
    """Refuse to overwrite any of ``names`` in ``out_dir`` unless ``force``.

    Raises
    ------
    OutputExistsError
        If ``out_dir`` is a file, or an output exists and ``force`` is False.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    clash = [n for n in names if (out / n).exists()]
    if clash and not force:
        raise OutputExistsError(f"{out / clash[0]}: exists; use --force to overwrite")
    return out


def write_staged(out_dir: str | os.PathLike, names: Sequence[str], force: bool, fill,
                 prefix: str = ".bayesfuse-") -> list[Path]:
    """Write a set of outputs all or nothing.

    Refuses to overwrite (unless ``force``), lets ``fill(stage)`` write
    ``names`` into a staging folder inside ``out_dir``, then moves them into
    place: an interruption leaves the old files or the new ones, never half
    of them.
    """
    import shutil

    out = check_outputs(out_dir, names, force)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=out))
    try:
        fill(stage)
        written = []
        for n in names:
            os.replace(stage / n, out / n)
            written.append(out / n)
        return written
    finally:
        shutil.rmtree(stage, ignore_errors=True)
