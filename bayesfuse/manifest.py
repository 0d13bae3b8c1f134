"""A study of many subjects: who they are and where their files live.

A dataset is read from either of two sources, both documented in the README
("Many subjects"):

A CSV manifest, one row per subject::

    subject,rater1,rater2,rater3,image,mask,reference
    s01,s01/r1.nii.gz,s01/r2.nii.gz,s01/r3.nii.gz,s01/ct.nii.gz,,s01/gt.nii.gz

- ``subject`` (required): the subject's id, also the name of its output
  folder, so it must be a plain file name;
- rater columns (at least one): every column whose name starts with
  ``rater`` (``rater1``, ``rater_alice``, ``rater:alice``, or a single
  ``raters`` column holding one 4-D file); the column name is the rater's
  name (``rater:alice`` names the rater ``alice``), so that the same rater
  keeps one name across subjects; an empty cell means that this rater did
  not segment this subject;
- optional ``image``, ``mask`` (or ``roi``) and ``reference`` (or ``truth``);
- any other column is kept as text in :attr:`Subject.meta` (age, site, ...);
- relative paths are relative to the CSV's folder; rows whose subject starts
  with ``#`` are comments.

A folder layout, one sub-folder per subject::

    STUDY/<subject>/raters/<rater>.nii.gz   one file per rater (name = rater)
    STUDY/<subject>/image.nii.gz            optional intensity image
    STUDY/<subject>/mask.nii.gz             optional region of interest (or roi.*)
    STUDY/<subject>/reference.nii.gz        optional reference segmentation (or truth.*)

Without a ``raters/`` folder, every other image file of the subject's folder
is a rater: the layout ``bayesfuse datasets ... --out STUDY/<subject>``
writes. Any format :func:`bayesfuse.io.read_image` reads may stand in for
``.nii.gz``. Hidden sub-folders, and sub-folders holding no image, are not
subjects.

Reading checks the manifest's structure (columns, ids, empty rows) and
refuses a bad one at once with an :class:`~bayesfuse.errors.InputError`
naming the file and line; whether the listed files exist and can be read is
each subject's own business (:meth:`Subject.load`), so that in a batch one
missing file fails one subject, not the study.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from .errors import InputError
from .io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, TIFF_SUFFIXES, _suffix

#: Column names (lower case) of the optional files, with their aliases.
ROLE_COLUMNS = {"image": ("image",), "mask": ("mask", "roi"), "reference": ("reference", "truth")}
#: File suffixes that count as images in the folder layout.
READABLE_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES + IMAGE_SUFFIXES
#: Names a subject may not take: they are the batch's own files in its output folder.
RESERVED_IDS = ("summary.csv",)


@dataclass(frozen=True)
class Subject:
    """One subject of a study: its raters' files and optional companions.

    Attributes
    ----------
    id : str
        The subject's id (a plain file name: it names the output folder).
    raters : tuple of Path
        One file per rater (or a single 4-D file holding all raters).
    rater_names : tuple of str
        One name per file of ``raters``: the CSV column or the file's stem.
    image, mask, reference : Path or None
        Intensity image, region of interest, reference segmentation.
    meta : mapping of str to str
        Other columns of the CSV row, as text.
    """

    id: str
    raters: tuple[Path, ...]
    rater_names: tuple[str, ...]
    image: Path | None = None
    mask: Path | None = None
    reference: Path | None = None
    meta: Mapping[str, str] = field(default_factory=dict)

    def files(self) -> dict[str, Path]:
        """Every input file by role: ``rater:<name>``, ``image``, ``mask``, ``reference``."""
        out = {f"rater:{n}": p for n, p in zip(self.rater_names, self.raters)}
        for role in ROLE_COLUMNS:
            p = getattr(self, role)
            if p is not None:
                out[role] = p
        return out

    def load(self, *, kind=None, n_classes: int | None = None, invert: bool = False, spacing: Sequence[float] | None = None):
        """The subject's raters (with image and ROI) as a :class:`~bayesfuse.data.RaterMaps`.

        Raters are named as in the manifest (not by file name), so that
        per-rater estimates line up across subjects: one file per rater takes
        the rater's name; a single file holding all raters gives
        ``<name>[0]``, ``<name>[1]``, ... Options as in
        :func:`bayesfuse.io.load_raters`.
        """
        from .io import load_raters

        data = load_raters(list(self.raters), image=self.image, mask=self.mask, kind=kind, n_classes=n_classes, invert=invert, spacing=spacing)
        names = list(self.rater_names)
        if len(names) == 1 and data.n_raters > 1:
            names = [f"{names[0]}[{i}]" for i in range(data.n_raters)]
        return replace(data, maps=data.maps.assign_coords(rater=names))

    def load_reference(self, shape: Sequence[int], *, invert: bool = False) -> np.ndarray:
        """The reference segmentation as integer labels on a grid of ``shape``.

        Raises
        ------
        InputError
            If there is no reference, or it is not a label map on that grid.
        """
        from .data import classify_values
        from .io import read_image

        if self.reference is None:
            raise InputError(self.id, "no reference segmentation given")
        arr, _ = read_image(self.reference, invert=invert)
        name = str(self.reference)
        if tuple(arr.shape) != tuple(shape):
            raise InputError(name, f"reference shape {tuple(arr.shape)} differs from the raters' {tuple(shape)}")
        kind, arr = classify_values(arr, name)
        if kind == "probability":
            raise InputError(name, "the reference must hold labels (0/1 or 0..K-1), not probabilities")
        return arr


@dataclass(frozen=True)
class Manifest:
    """The subjects of a study, in the order the manifest lists them.

    Attributes
    ----------
    source : Path
        The CSV file or the study folder it was read from.
    subjects : tuple of Subject
    """

    source: Path
    subjects: tuple[Subject, ...]

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[Subject]:
        return iter(self.subjects)

    def __getitem__(self, key: int | str) -> Subject:
        if isinstance(key, str):
            for s in self.subjects:
                if s.id == key:
                    return s
            raise KeyError(key)
        return self.subjects[key]

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.subjects]

    @property
    def rater_names(self) -> list[str]:
        """Every rater's name, in order of first appearance."""
        return list(dict.fromkeys(n for s in self.subjects for n in s.rater_names))

    def to_frame(self):
        """One row per subject, in the CSV manifest's columns (paths as text)."""
        import pandas as pd

        rows = []
        for s in self.subjects:
            row = {"subject": s.id}
            row.update({_rater_column(n): str(p) for n, p in zip(s.rater_names, s.raters)})
            row.update({role: str(getattr(s, role)) for role in ROLE_COLUMNS if getattr(s, role) is not None})
            row.update(s.meta)
            rows.append(row)
        return pd.DataFrame(rows).fillna("")

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write the manifest as CSV, atomically (absolute paths), e.g. to freeze a folder layout."""
        from .io import write_text_atomic

        return write_text_atomic(path, self.to_frame().to_csv(index=False))


# --------------------------------------------------------------------- read
def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a study: a CSV manifest, or a folder in the documented layout.

    Raises
    ------
    InputError
        Naming the file (and line) when the manifest is malformed, or the
        folder holds no subject.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(str(path), "no such manifest file or study folder")
    return read_folder(p) if p.is_dir() else read_csv(p)


def check_subject_id(sid: str, where: str) -> str:
    """Refuse ids that cannot name an output folder of their own."""
    if not sid:
        raise InputError(where, "empty subject id")
    bad = ("/" in sid or "\\" in sid or "\0" in sid or sid.startswith(".") or sid.lower() in RESERVED_IDS
           or sid != sid.strip())
    if bad:
        raise InputError(where, f"subject id {sid!r} cannot name an output folder (no slashes, no leading dot or space, not {', '.join(RESERVED_IDS)})")
    return sid


def _check_unique(ids: list[tuple[str, str]]) -> None:
    # Case-insensitive: two ids differing by case share a folder on macOS and Windows.
    seen: dict[str, str] = {}
    for sid, where in ids:
        key = sid.casefold()
        if key in seen:
            raise InputError(where, f"subject id {sid!r} repeats {seen[key]} (ids name output folders and must be unique, ignoring case)")
        seen[key] = f"{sid!r} of {where}"


def read_csv(path: str | os.PathLike) -> Manifest:
    """Read a CSV manifest (see the module docstring for its columns)."""
    path = Path(path).expanduser().absolute()
    base = path.parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError:
        raise InputError(path.name, "is not a UTF-8 text file (a CSV manifest was expected)") from None
    except csv.Error as exc:
        raise InputError(path.name, f"is not valid CSV ({exc})") from None
    rows = [(n, r) for n, r in rows if any(c.strip() for c in r)]
    if not rows:
        raise InputError(path.name, "the manifest is empty")
    header = [h.strip() for h in rows[0][1]]
    lower = [h.lower() for h in header]
    dup = sorted({h for h in lower if h and lower.count(h) > 1})
    if dup:
        raise InputError(path.name, f"repeated column(s) {', '.join(dup)}")
    if "subject" not in lower:
        raise InputError(path.name, f"no 'subject' column (columns: {', '.join(header)})")
    rater_cols = [i for i, h in enumerate(lower) if h.startswith("rater")]
    if not rater_cols:
        raise InputError(path.name, f"no rater column (columns named rater1, rater2, ... or raters; found: {', '.join(header)})")
    rnames = [_rater_name(header[i]) for i in rater_cols]
    dup = sorted({n for n in rnames if rnames.count(n) > 1})
    if dup:
        raise InputError(path.name, f"several columns name rater(s) {', '.join(dup)}")
    role_col: dict[str, int] = {}
    for role, names in ROLE_COLUMNS.items():
        found = [i for i, h in enumerate(lower) if h in names]
        if len(found) > 1:
            raise InputError(path.name, f"columns {', '.join(header[i] for i in found)} all give the {role}; keep one")
        if found:
            role_col[role] = found[0]
    i_subj = lower.index("subject")
    used = {i_subj, *rater_cols, *role_col.values()}
    meta_cols = [i for i in range(len(header)) if i not in used and header[i]]

    subjects, ids = [], []
    for line, row in rows[1:]:
        where = f"{path.name}, line {line}"
        if len(row) > len(header):
            raise InputError(where, f"{len(row)} cells for {len(header)} columns")
        cells = [c.strip() for c in row] + [""] * (len(header) - len(row))
        sid = cells[i_subj]
        if sid.startswith("#"):
            continue
        check_subject_id(sid, where)
        names = [_rater_name(header[i]) for i in rater_cols if cells[i]]
        files = [_resolve(base, cells[i]) for i in rater_cols if cells[i]]
        if not files:
            raise InputError(where, f"subject {sid!r} lists no rater file")
        roles = {role: _resolve(base, cells[i]) if cells[i] else None for role, i in role_col.items()}
        meta = {header[i]: cells[i] for i in meta_cols}
        subjects.append(Subject(id=sid, raters=tuple(files), rater_names=tuple(names), meta=meta, **roles))
        ids.append((sid, where))
    if not subjects:
        raise InputError(path.name, "the manifest lists no subject")
    _check_unique(ids)
    return Manifest(source=path, subjects=tuple(subjects))


def _rater_name(column: str) -> str:
    return column[len("rater:"):].strip() if column.lower().startswith("rater:") else column


def _rater_column(name: str) -> str:
    """The CSV column of a rater: its name if that starts with "rater", else ``rater:<name>``."""
    return name if name.lower().startswith("rater") else f"rater:{name}"


def _resolve(base: Path, cell: str) -> Path:
    p = Path(cell).expanduser()
    return p if p.is_absolute() else base / p


def _image_stem(p: Path) -> str | None:
    """The name without its image suffix, or None if the file is not an image."""
    suf = _suffix(p)
    if p.name.startswith(".") or suf not in READABLE_SUFFIXES or not p.is_file():
        return None
    return p.name[: -len(suf)]


def read_folder(path: str | os.PathLike) -> Manifest:
    """Read a study folder in the documented layout (see the module docstring)."""
    root = Path(path).expanduser().absolute()
    role_names = {n for names in ROLE_COLUMNS.values() for n in names}
    subjects, ids = [], []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        where = f"{root.name}/{d.name}"
        images = sorted((p for p in d.iterdir() if _image_stem(p) is not None), key=lambda p: p.name)
        if (d / "raters").is_dir():
            raters = sorted((p for p in (d / "raters").iterdir() if _image_stem(p) is not None), key=lambda p: p.name)
            if not raters:
                raise InputError(f"{where}/raters", "holds no image file (one file per rater: NIfTI, PNG or TIFF)")
        else:
            raters = [p for p in images if _image_stem(p) not in role_names]
            if not raters:
                continue
        check_subject_id(d.name, where)
        stems = [_image_stem(p) for p in raters]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            raise InputError(where, f"several files for rater(s) {', '.join(dup)} (e.g. a.nii and a.nii.gz)")
        roles = {}
        for role, names in ROLE_COLUMNS.items():
            found = [p for p in images if _image_stem(p) in names]
            if len(found) > 1:
                raise InputError(where, f"several files give the {role}: {', '.join(p.name for p in found)}")
            roles[role] = found[0] if found else None
        subjects.append(Subject(id=d.name, raters=tuple(raters), rater_names=tuple(stems), **roles))
        ids.append((d.name, where))
    if not subjects:
        raise InputError(str(path), "no subject found: expected one sub-folder per subject holding its raters' images (see the README, 'Many subjects')")
    _check_unique(ids)
    return Manifest(source=root, subjects=tuple(subjects))
