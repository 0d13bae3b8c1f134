"""FusionResult: what every model returns, as an :class:`xarray.DataTree`.

Schema (DESIGN.md, "Results"); every group is optional except ``consensus``:

``/`` (attrs)
    ``method``, ``model`` (module), ``config`` (JSON), ``bayesfuse_version``,
    ``affine`` (16 floats, row-major), ``spacing``, ``spatial_dims``,
    ``n_classes``, ``raters`` (JSON list of names), ``input_checksum``.
``/consensus``
    ``probability`` (*spatial, class): the fused probability map;
    ``labels`` (*spatial): its argmax.
``/variational``
    parameters of q (means, variances, tau, W, ...), model-specific.
``/raters``
    per-rater estimates, every variable with a leading ``rater`` dim; those
    with at most one more small dim go to ``raters.csv``.
``/optimizer``
    ``objective`` (iteration): the ELBO or EM log-likelihood at every
    iteration; attrs ``iterations``, ``converged``, ``stop_reason``,
    ``objective_name``, ``seconds``.
``/maps``
    extra spatial maps written as NIfTI beside the consensus, one file per
    variable named ``<variable>.nii.gz``; a variable with one non-spatial dim
    (``rater``, ``component``, ``class``) becomes a 4-D file with that dim last.
``/posterior``
    draws from q with ``chain`` and ``draw`` dims, made on request.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import xarray as xr

from .data import SPATIAL_DIMS, RaterMaps

#: The files :meth:`FusionResult.save` always writes.
CORE_OUTPUTS = ("consensus.nii.gz", "labels.nii.gz", "raters.csv", "result.nc")


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_json(config: Any) -> str:
    """A model Config (frozen dataclass) as a JSON string for attrs."""
    return json.dumps(_jsonable(config), sort_keys=True)


class FusionResult:
    """The outcome of a fusion: consensus, per-rater estimates, objective trace.

    Wraps an :class:`xarray.DataTree` (:attr:`tree`) that follows the schema of
    this module's docstring, so ArviZ functions and ``to_netcdf`` apply to it
    unchanged.
    """

    def __init__(self, tree: xr.DataTree):
        if "consensus" not in tree.children:
            raise ValueError("a FusionResult needs a /consensus group")
        self.tree = tree
        self._checksum_source: RaterMaps | None = None

    # ----------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        *,
        method: str,
        data: RaterMaps,
        config: Any,
        probability: np.ndarray,
        variational: xr.Dataset | Mapping[str, xr.DataArray] | None = None,
        raters: xr.Dataset | Mapping[str, xr.DataArray] | None = None,
        objective: np.ndarray | None = None,
        objective_name: str = "objective",
        converged: bool | None = None,
        stop_reason: str = "",
        seconds: float | None = None,
        maps: xr.Dataset | Mapping[str, xr.DataArray] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> "FusionResult":
        """Assemble a result from a solver's arrays.

        Parameters
        ----------
        method : str
            The registry name (``"staple"``, ``"robust-t"``, ...).
        data : RaterMaps
            The input, for geometry, rater names and checksums.
        config : dataclass
            The model's Config; stored as JSON in the attrs.
        probability : ndarray
            The consensus, (*spatial, K), or (*spatial) foreground for K = 2.
        variational, raters, maps : Dataset or mapping, optional
            Groups of the tree (see the module docstring).
        objective : ndarray, optional
            Objective per iteration.
        """
        sdims = data.spatial_dims
        prob = np.asarray(probability, dtype=np.float32)
        if prob.ndim == len(sdims):
            prob = np.stack([1 - prob, prob], axis=-1)
        if prob.shape[:-1] != data.shape:
            raise ValueError(f"consensus shape {prob.shape} does not match the data's {data.shape}")
        if not np.all(np.isfinite(prob)):
            raise FloatingPointError(f"{method}: the consensus holds NaN or infinite values")
        k = prob.shape[-1]
        if k == 2:
            # argmax over a last axis of length 2 is a slow strided loop (0.3 s
            # for 12M voxels); the comparison gives the same labels (ties -> 0)
            labels = np.greater(prob[..., 1], prob[..., 0]).view(np.uint8)
        else:
            labels = np.argmax(prob, axis=-1).astype(np.uint8 if k < 256 else np.uint16)
        consensus = xr.Dataset(
            {
                "probability": (sdims + ("class",), prob),
                "labels": (sdims, labels),
            },
            coords={"class": np.arange(k)},
        )
        groups: dict[str, xr.Dataset] = {"consensus": consensus}
        if variational is not None:
            groups["variational"] = _as_dataset(variational)
        if raters is not None:
            r = _as_dataset(raters)
            r = r.assign_coords(rater=data.rater_names)
            groups["raters"] = r
        if maps is not None:
            m = _as_dataset(maps)
            if "rater" in m.dims:
                m = m.assign_coords(rater=data.rater_names)
            groups["maps"] = m
        if objective is not None:
            obj = np.asarray(objective, dtype=float)
            opt = xr.Dataset({"objective": ("iteration", obj)}, coords={"iteration": np.arange(1, obj.size + 1)})
            opt.attrs.update(
                iterations=int(obj.size),
                converged=int(bool(converged)) if converged is not None else -1,
                stop_reason=stop_reason,
                objective_name=objective_name,
            )
            if seconds is not None:
                opt.attrs["seconds"] = float(seconds)
            groups["optimizer"] = opt

        from . import __version__

        root_attrs = {
            "method": method,
            "config": config_json(config),
            "bayesfuse_version": __version__,
            "affine": np.asarray(data.affine, dtype=float).ravel().tolist(),
            "spacing": list(map(float, data.spacing)),
            "spatial_dims": list(sdims),
            "n_classes": int(k),
            "raters": json.dumps(data.rater_names),
            "input_kind": data.kind,
        }
        if data.checksums:
            root_attrs["input_files"] = json.dumps(data.checksums, sort_keys=True)
            root_attrs["input_checksum"] = data.checksum()
        if attrs:
            root_attrs.update({k: _attr_value(v) for k, v in attrs.items()})
        tree = xr.DataTree.from_dict({"/": xr.Dataset(attrs=root_attrs), **{f"/{g}": ds for g, ds in groups.items()}})
        result = cls(tree)
        if "input_checksum" not in root_attrs:
            # Maps built from arrays: hashing them costs about ten read passes,
            # so it is done only if the result is saved (see save()).
            result._checksum_source = data
        return result

    # ------------------------------------------------------------- accessors
    @property
    def method(self) -> str:
        return str(self.tree.attrs["method"])

    @property
    def config(self) -> dict:
        return json.loads(self.tree.attrs["config"])

    @property
    def n_classes(self) -> int:
        return int(self.tree.attrs["n_classes"])

    @property
    def spatial_dims(self) -> tuple[str, ...]:
        return tuple(self.tree.attrs["spatial_dims"])

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.tree.attrs["affine"], dtype=float).reshape(4, 4)

    @property
    def rater_names(self) -> list[str]:
        return list(json.loads(self.tree.attrs["raters"]))

    @property
    def consensus(self) -> xr.DataArray:
        """Foreground probability for K = 2, else the (*spatial, class) map."""
        p = self.tree["consensus"]["probability"]
        if self.n_classes == 2:
            return p.isel({"class": 1}, drop=True).rename("consensus")
        return p.rename("consensus")

    @property
    def probability(self) -> xr.DataArray:
        """The consensus on the simplex, (*spatial, class), for any K."""
        return self.tree["consensus"]["probability"]

    @property
    def labels(self) -> xr.DataArray:
        return self.tree["consensus"]["labels"]

    @property
    def raters(self) -> pd.DataFrame:
        """Per-rater estimates, one row per rater (the contents of raters.csv)."""
        return raters_table(self.tree, self.rater_names)

    @property
    def objective(self) -> np.ndarray:
        if "optimizer" not in self.tree.children:
            return np.array([])
        return self.tree["optimizer"]["objective"].values

    @property
    def converged(self) -> bool | None:
        if "optimizer" not in self.tree.children:
            return None
        c = int(self.tree["optimizer"].attrs.get("converged", -1))
        return None if c < 0 else bool(c)

    @property
    def n_iter(self) -> int:
        return int(self.objective.size)

    def group(self, name: str) -> xr.Dataset:
        """One group of the tree as a Dataset (empty if absent)."""
        if name not in self.tree.children:
            return xr.Dataset()
        return self.tree[name].to_dataset()

    def posterior_draws(self, n: int = 1000, region=None, random_seed=None) -> xr.DataTree:
        """Draws from q with ``chain``/``draw`` dims, as an ArviZ-ready DataTree.

        Delegates to the model module's ``posterior_draws(result, n, region,
        random_seed)``; models without a posterior say so.
        """
        from .models import get_model

        spec = get_model(self.method)
        fn = getattr(spec.load(), "posterior_draws", None)
        if fn is None:
            raise NotImplementedError(f"{self.method} has no posterior to draw from (it is a point estimate)")
        return fn(self, n=n, region=region, random_seed=random_seed)

    def __repr__(self) -> str:
        shape = tuple(self.tree["consensus"]["labels"].shape)
        it = self.n_iter
        conv = self.converged
        return f"FusionResult(method={self.method!r}, shape={shape}, K={self.n_classes}, iterations={it}, converged={conv})"

    # ------------------------------------------------------------------- I/O
    def output_files(self) -> list[str]:
        """Names of the files :meth:`save` writes."""
        names = list(CORE_OUTPUTS)
        if "maps" in self.tree.children:
            names += [f"{v}.nii.gz" for v in self.tree["maps"].data_vars]
        return names

    def save(self, out_dir: str | os.PathLike, force: bool = False) -> list[Path]:
        """Write the CLI's outputs into ``out_dir``, atomically.

        Writes ``consensus.nii.gz`` (float32: foreground probability for K = 2,
        4-D with classes last otherwise), ``labels.nii.gz``, ``raters.csv``,
        ``result.nc`` and one NIfTI per variable of ``/maps``. Every file is
        first written into a staging folder beside ``out_dir`` and moved into
        place only once all are complete, so an interruption leaves either the
        old files or the new ones, never a half-written file.

        Raises
        ------
        OutputExistsError
            If an output exists and ``force`` is False (nothing is written).
        """
        from . import io

        if self._checksum_source is not None:
            io.check_outputs(out_dir, self.output_files(), force)  # before hashing the input
            self.tree.attrs["input_checksum"] = self._checksum_source.checksum()
            self._checksum_source = None
        aff, sdims = self.affine, self.spatial_dims

        def fill(stage: Path) -> None:
            io.write_nifti(stage / "consensus.nii.gz", _spatial_last(self.consensus, sdims), aff, spatial_ndim=len(sdims), description=f"bayesfuse {self.method} consensus")
            io.write_nifti(stage / "labels.nii.gz", self.labels.values, aff, description=f"bayesfuse {self.method} labels")
            self.raters.to_csv(stage / "raters.csv", index_label="rater")
            write_tree(self.tree, stage / "result.nc")
            if "maps" in self.tree.children:
                for v, da in self.tree["maps"].data_vars.items():
                    io.write_nifti(stage / f"{v}.nii.gz", _spatial_last(da, sdims), aff, spatial_ndim=len(sdims), description=str(da.attrs.get("description", f"bayesfuse {self.method} {v}")))

        return io.write_staged(out_dir, self.output_files(), force, fill)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FusionResult":
        """Read ``result.nc`` (or a folder holding it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "result.nc"
        tree = xr.open_datatree(p, engine="h5netcdf").load()
        return cls(tree)


def write_tree(tree: xr.DataTree, path: str | os.PathLike) -> None:
    """``tree.to_netcdf`` with gzip on every array larger than a few kB.

    Consensus and tau maps compress tenfold or more (smooth, many zeros).
    """
    encoding = {}
    for node in tree.subtree:
        enc = {v: {"zlib": True, "complevel": 4} for v, da in node.dataset.data_vars.items() if da.size > 4096 and da.dtype.kind in "biuf"}
        if enc:
            encoding[node.path] = enc
    tree.to_netcdf(path, engine="h5netcdf", encoding=encoding)


def _as_dataset(obj) -> xr.Dataset:
    if isinstance(obj, xr.Dataset):
        return obj
    return xr.Dataset(dict(obj))


def _attr_value(v):
    if isinstance(v, (str, int, float)):
        return v
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    return json.dumps(_jsonable(v))


def _spatial_last(da: xr.DataArray, sdims: tuple[str, ...]) -> np.ndarray:
    """Array with the spatial dims first and any other dim last (for NIfTI)."""
    other = [d for d in da.dims if d not in sdims]
    if len(other) > 1:
        raise ValueError(f"cannot write {da.name!r} as NIfTI: dims {da.dims} have more than one non-spatial dim")
    return da.transpose(*sdims, *other).values


def raters_table(tree: xr.DataTree, names: list[str]) -> pd.DataFrame:
    """The ``/raters`` group flattened to one row per rater.

    Variables with dims (rater,) give one column; (rater, d) give one column
    per entry of d, named ``<var>_<coord>``; (rater, d1, d2) (a confusion
    matrix) give ``<var>_<c1>_<c2>``. Per-voxel maps are left out.
    """
    df = pd.DataFrame(index=pd.Index(names, name="rater"))
    if "raters" not in tree.children:
        return df
    ds = tree["raters"].to_dataset()
    for v, da in ds.data_vars.items():
        if da.dims[0] != "rater" or any(d in SPATIAL_DIMS for d in da.dims):
            continue
        if da.ndim == 1:
            df[v] = da.values
        elif da.ndim in (2, 3) and da.size <= 64 * len(names):
            rest = da.dims[1:]
            coords = [da[d].values if d in da.coords else np.arange(da.sizes[d]) for d in rest]
            flat = da.values.reshape(len(names), -1)
            labels = [f"{v}_" + "_".join(str(c) for c in combo) for combo in np.array(np.meshgrid(*coords, indexing="ij")).reshape(len(rest), -1).T]
            for j, lab in enumerate(labels):
                df[lab] = flat[:, j]
    return df
