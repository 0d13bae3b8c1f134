"""Many subjects at once on Dask: resumable, one atomic folder per subject.

:func:`run_batch` fuses every subject of a study (:mod:`bayesfuse.manifest`)
with one method and writes, under the output folder ``DIR``:

``DIR/<subject>/``
    the outputs of :meth:`bayesfuse.result.FusionResult.save` and
    ``done.json``, the subject's completion record. The folder is built in a
    hidden staging folder beside it and renamed into place once whole, so an
    interruption (Ctrl-C, a killed worker or machine) never leaves a
    half-written subject: either the old folder or the new one.
``DIR/summary.csv``
    one row per subject (see :data:`SUMMARY_COLUMNS`, then one column
    ``<estimate>[<rater>]`` per per-rater scalar estimate of the method),
    rewritten atomically as subjects finish.

A subject is done when its record's input checksums (SHA-256 of every file:
raters, image, mask, reference) and settings (method, the resolved Config,
conversion and solver options) equal the current ones and its outputs are
all there; a rerun skips it (status ``skipped``) and redoes the rest. A
subject that fails (unreadable file, model error) gets status ``failed`` and
its one-line error, and does not stop the others.

Each subject is one Dask task. Without a client, a ``LocalCluster`` bound to
127.0.0.1 runs them in worker processes, one thread each by default; every
subject runs single-threaded (BLAS, OpenMP and numba limited to the
worker's threads), so that parallelism comes from workers and no core is
oversubscribed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

from .errors import ConfigError, InputError
from .manifest import Manifest, Subject, read_manifest
from .summaries import DEFAULT_MASS

log = logging.getLogger(__name__)

#: Name of a subject's completion record, written last into its folder.
RECORD = "done.json"
#: The summary's fixed columns, in order; per-rater estimates follow.
SUMMARY_COLUMNS = ("subject", "status", "iterations", "converged", "seconds", "dice", "error")
#: Statuses: computed in this run, finished earlier with the same inputs and
#: settings, failed, not reached (the run was interrupted).
STATUSES = ("done", "skipped", "failed", "pending")
#: Prefixes of the hidden folders a run works in (removed at the next start).
STAGE_PREFIX, OLD_PREFIX = ".stage-", ".old-"
LOCK_FILE = ".bayesfuse-batch.lock"
#: Fraction of the machine's memory that a local cluster's workers share.
MEMORY_FRACTION = 0.8
#: Preload (script text) of a local cluster's workers. Ctrl-C in a terminal
#: reaches every process of the group: the workers leave it to the driver,
#: which cancels the run and closes the cluster, instead of each dying with
#: a traceback.
WORKER_PRELOAD = """
import signal


def dask_setup(worker):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
"""


@dataclass(frozen=True)
class Settings:
    """Everything besides the input files that decides a subject's outputs.

    Two runs with equal settings and equal input checksums give the same
    outputs, so the first run's outputs are kept (a random seed of None is
    taken as a setting like any other).
    """

    method: str
    config: Any
    to_prob: str = "none"
    to_prob_options: dict = field(default_factory=dict)
    max_iter: int | None = None
    tol: float | None = None
    random_seed: int | None = None
    kind: str | None = None
    n_classes: int | None = None
    invert: bool = False
    spacing: tuple[float, ...] | None = None
    interval_mass: float = DEFAULT_MASS

    def record(self) -> dict:
        """The settings as plain JSON values (how records compare them)."""
        from .result import config_json

        return json.loads(config_json(self))


# ------------------------------------------------------------ one subject
def input_checksums(subject: Subject) -> dict[str, str]:
    """SHA-256 of each input file by role (a missing file is an InputError)."""
    from .io import file_checksum

    sums = {}
    for role, path in subject.files().items():
        if not path.is_file():
            raise InputError(str(path), f"no such file ({role} of subject {subject.id})")
        sums[role] = file_checksum(path)
    return sums


def read_record(folder: Path) -> dict | None:
    """A subject folder's completion record, or None if absent or unreadable."""
    try:
        rec = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def is_done(folder: Path, checksums: dict[str, str], settings: dict) -> dict | None:
    """The record if ``folder`` holds whole outputs for these inputs and settings."""
    rec = read_record(folder)
    if rec is None or rec.get("checksums") != checksums or rec.get("settings") != settings:
        return None
    if not all((folder / name).is_file() for name in rec.get("outputs", [])):
        return None
    return rec


def publish(stage: Path, final: Path) -> None:
    """Put a whole staged subject folder in place of ``final``.

    ``rename`` is atomic but cannot replace a non-empty folder: the old one
    is first moved aside under a hidden name. A crash between the two
    renames leaves no subject folder (so the subject is redone), never a
    mixture of old and new files.
    """
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise InputError(str(final), "exists and is not a subject folder; remove it")
        old = final.parent / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(stage, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, final)


def one_line(exc: BaseException) -> str:
    """An exception as one line: the message as is for input errors, else with its type."""
    text = " ".join(str(exc).split()) or repr(exc)
    if isinstance(exc, (InputError, ConfigError)):
        return text
    return f"{type(exc).__name__}: {text}"


def rater_estimates(result) -> dict[str, float]:
    """The method's per-rater scalar estimates as ``{"<var>[<rater>]": value}``."""
    if "raters" not in result.tree.children:
        return {}
    ds = result.tree["raters"].to_dataset()
    out = {}
    for var, da in ds.data_vars.items():
        if da.dims == ("rater",) and da.dtype.kind in "biuf":
            for name, v in zip(result.rater_names, da.values):
                out[f"{var}[{name}]"] = float(v)
    return out


def reference_dice(result, subject: Subject, roi=None, invert: bool = False) -> float:
    """Dice of the consensus labels against the subject's reference, within ``roi``.

    For K > 2 classes: the mean over the foreground classes 1..K-1 of each
    class's Dice (an absent class in both counts as 1, as in
    :func:`bayesfuse.metrics.dice`).
    """
    from . import metrics

    labels = result.labels.values
    ref = subject.load_reference(labels.shape, invert=invert)
    k = max(result.n_classes, int(ref.max()) + 1)
    return float(sum(metrics.dice(labels == c, ref == c, roi=roi) for c in range(1, k)) / (k - 1))


def fuse_subject(subject: Subject, out_dir: str | os.PathLike, spec, settings: Settings, *,
                 force: bool = False, run_id: str = "", command: str = "") -> dict:
    """Fuse one subject into ``out_dir/<subject>/`` unless it is already done.

    Runs on a Dask worker (or anywhere): reads the inputs, fits, adds the
    per-voxel posterior summaries and provenance as ``bayesfuse fuse`` does,
    saves into a staging folder with the completion record last, and renames
    the folder into place. Never raises for a bad subject: the returned
    summary row has status ``failed`` and the error instead.

    Returns
    -------
    dict
        The subject's summary row (keys :data:`SUMMARY_COLUMNS` and
        estimates).
    """
    from . import api, report, summaries

    t0 = time.perf_counter()
    out = Path(out_dir)
    final = out / subject.id
    stage = None
    wanted = settings.record()
    try:
        checksums = input_checksums(subject)
        if not force:
            rec = is_done(final, checksums, wanted)
            if rec is not None:
                return {**rec["summary"], "status": "skipped"}
        data = subject.load(kind=settings.kind, n_classes=settings.n_classes, invert=settings.invert, spacing=settings.spacing)
        data = api.convert(data, settings.to_prob, **settings.to_prob_options)
        kwargs: dict[str, Any] = {"random_seed": settings.random_seed, "progress": False, "method": settings.method}
        if settings.max_iter is not None:
            kwargs["max_iter"] = settings.max_iter
        if settings.tol is not None:
            kwargs["tol"] = settings.tol
        result = spec.load().fit(data, settings.config, **kwargs)
        seed = settings.random_seed if settings.random_seed is not None else 0
        result = summaries.attach(result, settings.interval_mass, random_seed=seed)
        report.stamp(result, command or f"bayesfuse batch (subject {subject.id})")
        dice = reference_dice(result, subject, data.roi(), settings.invert) if subject.reference is not None else math.nan
        stage = out / f"{STAGE_PREFIX}{subject.id}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        # Inside a Dask worker, xarray would guard the NetCDF write with a
        # cluster-wide lock held by the scheduler, serialising every
        # subject's write; the arrays are in memory, a local lock is enough.
        with _local_write_lock():
            written = result.save(stage)
        row = {
            "subject": subject.id,
            "status": "done",
            "iterations": result.n_iter,
            "converged": result.converged,
            "seconds": round(time.perf_counter() - t0, 3),
            "dice": dice,
            "error": "",
            **rater_estimates(result),
        }
        record = {
            "subject": subject.id,
            "checksums": checksums,
            "files": {role: str(p) for role, p in subject.files().items()},
            "settings": wanted,
            "outputs": [Path(w).name for w in written],
            "summary": row,
            "run_id": run_id,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "bayesfuse_version": result.tree.attrs.get("bayesfuse_version", ""),
        }
        from .io import write_text_atomic

        # NaN is not JSON: the record stores a missing Dice as null.
        write_text_atomic(stage / RECORD, json.dumps(_json_safe(record), indent=1))
        publish(stage, final)
        stage = None
        return row
    except Exception as exc:  # one bad subject must not stop the study
        if not isinstance(exc, (InputError, ConfigError)):
            log.warning("subject %s failed", subject.id, exc_info=True)
        return {"subject": subject.id, "status": "failed", "seconds": round(time.perf_counter() - t0, 3), "error": one_line(exc)}
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _local_write_lock():
    try:
        import dask
    except ImportError:  # fuse_subject called without Dask: nothing to avoid
        return contextlib.nullcontext()
    return dask.config.set(scheduler="sync")


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------- summary
def summary_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """Summary rows as a DataFrame indexed by subject, columns in a fixed order."""
    df = pd.DataFrame(list(rows))
    for c in SUMMARY_COLUMNS:
        if c not in df:
            df[c] = None
    extra = [c for c in df.columns if c not in SUMMARY_COLUMNS]
    df = df[list(SUMMARY_COLUMNS) + extra]
    df["iterations"] = pd.to_numeric(df["iterations"]).astype("Int64")
    df["converged"] = df["converged"].astype("boolean")
    df["seconds"] = pd.to_numeric(df["seconds"]).astype(float)
    df["dice"] = pd.to_numeric(df["dice"]).astype(float)
    df["error"] = [e if isinstance(e, str) else "" for e in df["error"]]
    return df.set_index("subject")


def write_summary(out: Path, rows: Sequence[dict]) -> pd.DataFrame:
    """Write ``summary.csv`` atomically and return it as a DataFrame."""
    from .io import write_text_atomic

    df = summary_frame(rows)
    write_text_atomic(out / "summary.csv", df.to_csv(float_format="%.6g"))
    return df


def read_summary(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``summary.csv`` (or the batch folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.csv"
    df = pd.read_csv(p, index_col="subject", keep_default_na=False, na_values=[""])
    return summary_frame(df.reset_index().to_dict("records"))


# ---------------------------------------------------------------- cluster
def default_workers(threads_per_worker: int = 1) -> int:
    """As many single-threaded workers as this process may use cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, threads_per_worker))


@contextlib.contextmanager
def open_client(client=None, scheduler: str | None = None, n_workers: int | None = None,
                threads_per_worker: int = 1, memory_limit: str | int | None = None) -> Iterator:
    """The Dask client to run on: the given one, one at ``scheduler``, or a local cluster.

    A client this function creates is closed on exit (with its local
    cluster, whose worker processes end with it).
    """
    if client is not None:
        yield client
        return
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - the [batch] extra is missing
        raise ConfigError("batch fusion needs dask.distributed: pip install 'bayesfuse[batch]'") from None
    if scheduler:
        with Client(scheduler) as c:
            yield c
        return
    n = n_workers or default_workers(threads_per_worker)
    if memory_limit is None:
        from distributed.system import MEMORY_LIMIT

        memory_limit = int(MEMORY_FRACTION * MEMORY_LIMIT / n)
    # Each task is one subject: its numerical libraries get the worker's
    # threads and no more, else n workers x all cores oversubscribe the machine.
    t = str(threads_per_worker)
    env = {"OMP_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t, "MKL_NUM_THREADS": t, "NUMBA_NUM_THREADS": t}
    with _quiet_dask(), LocalCluster(
        host="127.0.0.1", n_workers=n, threads_per_worker=threads_per_worker, processes=True,
        dashboard_address=None, memory_limit=memory_limit, env=env, preload=[WORKER_PRELOAD],
    ) as cluster, Client(cluster) as c:
        yield c


@contextlib.contextmanager
def _quiet_dask() -> Iterator[None]:
    """Keep the cluster's start-up and shut-down chatter (INFO) off the user's screen."""
    logger = logging.getLogger("distributed")
    old = logger.level
    logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Refuse a second batch writing into the same folder at the same time."""
    f = open(out / LOCK_FILE, "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(str(out), "another batch is writing into this folder; wait for it or choose another --out") from None
        yield
    finally:
        f.close()


def _clean_leftovers(out: Path) -> None:
    """Remove staging folders an interrupted run left (never a subject folder)."""
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith((STAGE_PREFIX, OLD_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


# -------------------------------------------------------------------- run
def run_batch(
    manifest: str | os.PathLike | Manifest,
    method: str,
    out_dir: str | os.PathLike,
    *,
    options: dict | None = None,
    client=None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int | None = None,
    to_prob: str = "none",
    to_prob_options: dict | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    random_seed: int | None = None,
    kind: str | None = None,
    n_classes: int | None = None,
    invert: bool = False,
    spacing: Sequence[float] | None = None,
    interval_mass: float = DEFAULT_MASS,
    force: bool = False,
    progress: bool | None = None,
    command: str = "",
) -> pd.DataFrame:
    """Fuse every subject of a study with one method, on Dask.

    Parameters
    ----------
    manifest : path or Manifest
        A CSV manifest or a study folder (:func:`bayesfuse.manifest.read_manifest`).
    method : str
        A name from the zoo (``bayesfuse models``).
    out_dir : path
        ``DIR``: one folder per subject and ``summary.csv``.
    options : dict, optional
        Fields of the method's Config (``-o key=value`` on the command line).
    client : dask.distributed.Client, optional
        Run on this client (e.g. a notebook's); it is left open.
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``), when no client
        is given. Its workers need bayesfuse installed and must see the
        input files and ``out_dir`` at the same paths.
    n_workers, threads_per_worker, memory_limit : optional
        The local cluster's size when neither ``client`` nor ``scheduler``
        is given: by default one single-threaded worker per core, sharing
        80 % of the machine's memory.
    to_prob, to_prob_options, max_iter, tol, random_seed, kind, n_classes, invert, spacing
        As in :func:`bayesfuse.fuse`; the same for every subject.
    interval_mass : float
        Mass of the central credible interval among the per-voxel summaries
        (as ``bayesfuse fuse --interval-mass``).
    force : bool
        Recompute every subject, even those already done.
    progress : bool, optional
        Show a progress bar over subjects (default: yes unless quiet).
    command : str, optional
        The command line to record in each result (provenance).

    Returns
    -------
    pandas.DataFrame
        The summary, indexed by subject (the contents of ``summary.csv``).

    Raises
    ------
    InputError, ConfigError
        Before any work, for a bad manifest, method or option. Errors of
        single subjects do not raise: see the ``status`` and ``error`` columns.

    Notes
    -----
    The local cluster's workers are spawned processes that import the
    calling script: a script (not a notebook) that calls this function
    without a client must do so under ``if __name__ == "__main__":``, as
    with any Dask ``LocalCluster``. A method registered at run time
    (:func:`bayesfuse.models.register`) works as long as the workers can
    import its module.
    """
    from .api import TO_PROB
    from .models import get_model
    from .summaries import check_mass

    study = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    spec = get_model(method)
    config = spec.config(**(options or {}))
    if to_prob not in TO_PROB:
        raise ConfigError(f"unknown conversion {to_prob!r}; choose one of {', '.join(TO_PROB)}")
    if threads_per_worker < 1 or (n_workers is not None and n_workers < 1):
        raise ConfigError("--workers and --threads-per-worker must be at least 1")
    settings = Settings(
        method=method, config=config, to_prob=to_prob, to_prob_options=dict(to_prob_options or {}),
        max_iter=max_iter, tol=tol, random_seed=random_seed, kind=kind, n_classes=n_classes,
        invert=invert, spacing=tuple(spacing) if spacing is not None else None,
        interval_mass=check_mass(interval_mass),
    )
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InputError(str(out_dir), "exists and is not a folder")
    if study.source.is_dir() and out.resolve() == study.source.resolve():
        raise InputError(str(out_dir), "is the study folder itself; write the outputs elsewhere")
    out.mkdir(parents=True, exist_ok=True)

    run_id = uuid.uuid4().hex
    order = study.ids
    rows: dict[str, dict] = {sid: {"subject": sid, "status": "pending"} for sid in order}
    with _lock(out):
        _clean_leftovers(out)
        n_local = min(n_workers or default_workers(threads_per_worker), len(study))
        try:
            with open_client(client, scheduler, n_local, threads_per_worker, memory_limit) as c:
                _run_on(c, study, out, spec, settings, force, run_id, rows, progress, command)
        except BaseException:
            # Interrupted: once the cluster is closed (no worker can still
            # publish), the summary tells which subjects this run finished.
            for sid in order:
                rec = read_record(out / sid) if rows[sid]["status"] == "pending" else None
                if rec is not None and rec.get("run_id") == run_id:
                    rows[sid] = rec["summary"]
            write_summary(out, [rows[s] for s in order])
            raise
    return write_summary(out, [rows[s] for s in order])


def _run_on(client, study: Manifest, out: Path, spec, settings: Settings, force: bool, run_id: str,
            rows: dict[str, dict], progress: bool | None, command: str) -> None:
    """Run one task per subject, as many at a time as the cluster has threads.

    Subjects are handed out as threads free up rather than all at once (Dask
    would queue small groups of tasks on the workers eagerly): subjects last
    seconds to minutes, so nothing is gained by queuing, a worker would sit
    idle at the end while another still holds a waiting subject, and a
    subject that kills its worker would fail the subjects queued behind it.
    """
    from dask.distributed import as_completed

    from . import progress as _progress

    todo = iter(study)
    futures: dict = {}
    running = as_completed()

    def submit_next() -> bool:
        s = next(todo, None)
        if s is None:
            return False
        fut = client.submit(fuse_subject, s, str(out), spec, settings, force=force, run_id=run_id, command=command,
                            key=f"bayesfuse-{s.id}-{run_id[:8]}", pure=False)
        futures[fut] = s.id
        running.add(fut)
        return True

    def fill() -> None:
        # Re-read the cluster's size each time: an adaptive cluster grows and shrinks.
        slots = max(1, sum(client.nthreads().values()))
        while running.count() < slots and submit_next():
            pass

    try:
        with _progress.bar(f"batch {settings.method}", total=len(study), progress=progress) as bar:
            fill()
            for fut in running:
                sid = futures[fut]
                try:
                    rows[sid] = fut.result()
                except Exception as exc:  # the worker died (memory?) or the task was lost
                    rows[sid] = {"subject": sid, "status": "failed", "error": f"the worker running it died or was lost ({one_line(exc)})"}
                write_summary(out, [rows[s] for s in study.ids])
                bar.advance(info=f"{sid}: {rows[sid]['status']}")
                fill()
    except BaseException:
        client.cancel(list(futures))
        raise
