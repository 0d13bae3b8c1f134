"""Batch fusion of many subjects (bayesfuse.batch, ``bayesfuse batch``).

The subject-level logic (skip, redo, fail, atomic folders) is tested by
calling :func:`bayesfuse.batch.fuse_subject` directly; the Dask side runs
real local clusters: in-process for the API and the command, and in a
subprocess that is killed (SIGKILL to the whole process group, workers
included) or interrupted (SIGINT, as Ctrl-C sends it) once the first subject
has finished.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import bayesfuse
from bayesfuse import batch, cli, phantoms
from bayesfuse.errors import InputError
from bayesfuse.io import write_nifti
from bayesfuse.manifest import read_manifest
from bayesfuse.models import get_model
from bayesfuse.result import FusionResult

SHAPE = (20, 18, 16)
SPACING = (1.2, 1.2, 2.5)


@functools.lru_cache(maxsize=None)
def _phantom(seed: int):
    """A small 3-D phantom with three binary raters (made once per session)."""
    return phantoms.make_phantom("simple", shape=SHAPE, n_raters=3, random_seed=seed, spacing=SPACING)


def make_study(root: Path, n: int, seed: int = 0, reference: bool = True) -> Path:
    """``n`` small phantom subjects written as NIfTI files, and their CSV manifest."""
    lines = ["subject,rater1,rater2,rater3" + (",reference" if reference else "")]
    for i in range(n):
        sid = f"s{i:02d}"
        ph = _phantom(seed + i)
        (root / sid).mkdir(parents=True, exist_ok=True)
        cells = [sid]
        for r, m in enumerate(ph.raters.maps.values):
            write_nifti(root / sid / f"rater{r + 1}.nii.gz", m, ph.raters.affine)
            cells.append(f"{sid}/rater{r + 1}.nii.gz")
        if reference:
            write_nifti(root / sid / "reference.nii.gz", ph.truth, ph.raters.affine)
            cells.append(f"{sid}/reference.nii.gz")
        lines.append(",".join(cells))
    csv = root / "manifest.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def corrupt(path: Path) -> None:
    """Truncate a file to half its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def assert_whole(folder: Path) -> dict:
    """Every output the record lists is there and reads back; returns the record."""
    rec = json.loads((folder / batch.RECORD).read_text())
    assert set(rec["outputs"]) >= {"consensus.nii.gz", "labels.nii.gz", "raters.csv", "result.nc"}
    for name in rec["outputs"]:
        p = folder / name
        if name.endswith(".nii.gz"):
            assert np.all(np.isfinite(nib.load(p).get_fdata()))
    res = FusionResult.load(folder)
    assert tuple(res.labels.shape) == SHAPE
    assert len(pd.read_csv(folder / "raters.csv")) == 3
    return rec


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith((batch.STAGE_PREFIX, batch.OLD_PREFIX)))


def settings(method="majority-vote", **options) -> batch.Settings:
    return batch.Settings(method=method, config=get_model(method).config(**options))


# ------------------------------------------------------ one subject, no Dask
def test_subject_skipped_when_unchanged_redone_when_anything_changes(tmp_path):
    study = read_manifest(make_study(tmp_path / "study", 1))
    s = study["s00"]
    out = tmp_path / "out"
    out.mkdir()
    spec = get_model("majority-vote")

    row = batch.fuse_subject(s, out, spec, settings(), run_id="first")
    assert row["status"] == "done" and row["error"] == ""
    rec = assert_whole(out / "s00")
    assert rec["run_id"] == "first" and rec["checksums"].keys() == {"rater:rater1", "rater:rater2", "rater:rater3", "reference"}
    # The consensus of a batch subject is the one fuse() gives on the same files.
    direct = bayesfuse.fuse(list(s.raters), "majority-vote")
    np.testing.assert_array_equal(FusionResult.load(out / "s00").labels.values, direct.labels.values)
    assert row["dice"] > 0.8
    assert set(row) >= {"agreement[rater1]", "agreement[rater3]"}

    again = batch.fuse_subject(s, out, spec, settings(), run_id="second")
    assert again == {**row, "status": "skipped"}
    assert batch.read_record(out / "s00")["run_id"] == "first"

    def redone(run_id, st=None, **kw) -> bool:
        r = batch.fuse_subject(s, out, spec, st or settings(), run_id=run_id, **kw)
        return r["status"] == "done" and batch.read_record(out / "s00")["run_id"] == run_id

    assert redone("option changed", settings(ties="lowest"))
    assert not redone("same again", settings(ties="lowest"))
    assert redone("back to the default")
    assert redone("forced", force=True)
    arr = np.asarray(nib.load(s.raters[1]).dataobj).copy()
    arr[0, 0, 0] = 1 - arr[0, 0, 0]
    write_nifti(s.raters[1], arr, nib.load(s.raters[1]).affine)
    assert redone("rater file changed")
    write_nifti(s.reference, np.zeros(SHAPE, np.uint8), nib.load(s.reference).affine)
    assert redone("reference changed")
    (out / "s00" / "labels.nii.gz").unlink()
    assert redone("an output was deleted")
    assert_whole(out / "s00")
    assert leftovers(out) == []


def test_failing_subject_is_recorded_and_leaves_no_folder(tmp_path):
    study = read_manifest(make_study(tmp_path / "study", 2))
    out = tmp_path / "out"
    out.mkdir()
    spec = get_model("majority-vote")
    corrupt(study["s00"].raters[2])
    row = batch.fuse_subject(study["s00"], out, spec, settings())
    assert row["status"] == "failed"
    assert row["error"].startswith(f"{study['s00'].raters[2]}: cannot be read") and "\n" not in row["error"]
    assert not (out / "s00").exists() and leftovers(out) == []
    study["s01"].raters[0].unlink()
    row = batch.fuse_subject(study["s01"], out, spec, settings())
    assert row["status"] == "failed" and "rater1.nii.gz: no such file (rater:rater1 of subject s01)" in row["error"]


def test_failure_after_a_change_keeps_the_previous_outputs_whole(tmp_path):
    s = read_manifest(make_study(tmp_path / "study", 1))["s00"]
    out = tmp_path / "out"
    out.mkdir()
    spec = get_model("majority-vote")
    assert batch.fuse_subject(s, out, spec, settings(), run_id="good")["status"] == "done"
    corrupt(s.raters[0])
    assert batch.fuse_subject(s, out, spec, settings(), run_id="bad")["status"] == "failed"
    assert assert_whole(out / "s00")["run_id"] == "good"


def test_interruption_while_writing_leaves_old_folder_or_none(tmp_path, monkeypatch):
    # Ctrl-C in the middle of save(): after consensus and labels, before result.nc.
    s = read_manifest(make_study(tmp_path / "study", 1))["s00"]
    out = tmp_path / "out"
    out.mkdir()
    spec = get_model("majority-vote")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("bayesfuse.result.write_tree", interrupted)
        with pytest.raises(KeyboardInterrupt):
            batch.fuse_subject(s, out, spec, settings())
    assert not (out / "s00").exists() and leftovers(out) == []

    assert batch.fuse_subject(s, out, spec, settings(), run_id="old")["status"] == "done"
    with monkeypatch.context() as m:
        m.setattr("bayesfuse.result.write_tree", interrupted)
        with pytest.raises(KeyboardInterrupt):
            batch.fuse_subject(s, out, spec, settings(ties="lowest"), run_id="new")
    assert assert_whole(out / "s00")["run_id"] == "old" and leftovers(out) == []


def test_publish_swaps_whole_folders(tmp_path):
    final, stage = tmp_path / "s1", tmp_path / ".stage-s1-x"
    final.mkdir()
    (final / "stale.nii.gz").write_text("old")
    stage.mkdir()
    (stage / "done.json").write_text("{}")
    batch.publish(stage, final)
    assert sorted(p.name for p in final.iterdir()) == ["done.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1"]
    (tmp_path / "file").write_text("x")
    stage.mkdir()
    with pytest.raises(InputError, match="exists and is not a subject folder"):
        batch.publish(stage, tmp_path / "file")


# ---------------------------------------------------------------- on Dask
def test_command_reports_a_corrupt_subject_and_fuses_the_others(tmp_path, capsys):
    csv = make_study(tmp_path / "study", 4)
    corrupt(tmp_path / "study" / "s02" / "rater2.nii.gz")
    # A crashed earlier run's staging folder is cleaned up.
    out = tmp_path / "out"
    (out / ".stage-s01-deadbeef").mkdir(parents=True)
    (out / ".stage-s01-deadbeef" / "consensus.nii.gz").write_text("half")
    rc = cli.main(["batch", str(csv), "-m", "majority-vote", "--out", str(out), "--workers", "2", "-o", "ties=lowest", "-q"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "subject s02 failed:" in err and "rater2.nii.gz: cannot be read" in err
    summary = batch.read_summary(out)
    assert list(summary.index) == ["s00", "s01", "s02", "s03"]
    assert list(summary["status"]) == ["done", "done", "failed", "done"]
    assert summary.loc["s02", "error"].startswith(str(tmp_path / "study" / "s02" / "rater2.nii.gz"))
    ok = summary[summary["status"] == "done"]
    assert (ok["dice"] > 0.8).all() and (ok["iterations"] == 0).all() and (ok["seconds"] > 0).all()
    assert ok["agreement[rater2]"].between(0.5, 1).all()
    assert sorted(p.name for p in out.iterdir()) == [".bayesfuse-batch.lock", "s00", "s01", "s03", "summary.csv"]
    for sid in ok.index:
        assert assert_whole(out / sid)["settings"]["config"]["ties"] == "lowest"


def test_python_api_with_an_existing_client(tmp_path):
    from dask.distributed import Client

    csv = make_study(tmp_path / "study", 3, reference=False)
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        df = batch.run_batch(csv, "mean", tmp_path / "out", client=client, progress=False)
        assert client.status == "running"  # the caller's client is left open
        again = batch.run_batch(csv, "mean", tmp_path / "out", client=client, progress=False)
    assert list(df["status"]) == ["done"] * 3 and df["dice"].isna().all()
    assert list(again["status"]) == ["skipped"] * 3
    pd.testing.assert_frame_equal(again.drop(columns="status"), df.drop(columns="status"))
    pd.testing.assert_frame_equal(batch.read_summary(tmp_path / "out"), again)


def test_command_on_a_running_scheduler(tmp_path, capsys):
    from dask.distributed import LocalCluster

    csv = make_study(tmp_path / "study", 2)
    with LocalCluster(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        rc = cli.main(["batch", str(csv), "-m", "majority-vote", "--out", str(tmp_path / "out"), "--scheduler", cluster.scheduler_address])
        assert rc == 0
        assert "bayesfuse" in cluster.scheduler.task_prefixes  # the subjects ran on that cluster
    assert "majority-vote: 2 subjects (2 done)" in capsys.readouterr().out
    assert list(batch.read_summary(tmp_path / "out")["status"]) == ["done", "done"]


CRASHING_METHOD = """
import os
from bayesfuse.models import baselines

Config = baselines.Config


def fit(data, config=None, **kwargs):
    if any("/s01/" in s for s in data.sources):
        os._exit(1)  # as a segfault or the kernel's OOM killer would end the worker
    return baselines.fit(data, config, **kwargs)
"""


def test_a_subject_that_kills_its_worker_fails_alone(tmp_path, monkeypatch):
    import dask
    from bayesfuse.models import REGISTRY, ModelSpec

    (tmp_path / "crashing_vote.py").write_text(textwrap.dedent(CRASHING_METHOD))
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    monkeypatch.setitem(REGISTRY, "crashing-vote", ModelSpec(
        name="crashing-vote", module="crashing_vote", summary="dies on s01", input="labels", pymc=False,
        defaults={"rule": "majority-vote"}))
    csv = make_study(tmp_path / "study", 3)
    # No retry of the lost task (Dask retries it 3 times by default).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        df = batch.run_batch(csv, "crashing-vote", tmp_path / "out", n_workers=2, progress=False)
    assert list(df["status"]) == ["done", "failed", "done"]
    assert df.loc["s01", "error"].startswith("the worker running it died or was lost")
    assert not (tmp_path / "out" / "s01").exists()
    for sid in ("s00", "s02"):
        assert_whole(tmp_path / "out" / sid)


@pytest.mark.data
def test_lidc_slices_majority_vote_reproduces_the_sources_consensus(shared_data, tmp_path):
    # LIDC crops: one TIFF stack of 2 to 4 radiologists per slice; the
    # source's GT is the majority vote with ties to foreground (data README).
    d = shared_data / "lidc-crops" / "test"
    stems = sorted(p.name for p in (d / "masks" / "annots").glob("*.tif"))[:6]
    if len(stems) < 6:
        pytest.skip(f"LIDC crops incomplete in {d}")
    csv = tmp_path / "lidc.csv"
    csv.write_text("subject,raters,image,reference\n" + "".join(
        f"{Path(n).stem},{d / 'masks/annots' / n},{d / 'scans' / n},{d / 'masks/GT' / n}\n" for n in stems))
    from dask.distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        df = batch.run_batch(csv, "majority-vote", tmp_path / "out", client=client, progress=False)
    assert (df["status"] == "done").all(), df["error"]
    np.testing.assert_array_equal(df["dice"].values, 1.0)
    # Raters of a stacked file are numbered after the column, alike in every subject.
    assert {"agreement[raters[0]]", "agreement[raters[1]]"} <= set(df.columns)


def test_refusals_before_any_work(tmp_path):
    csv = make_study(tmp_path / "study", 1)
    out = tmp_path / "out"
    assert cli.main(["batch", str(csv), "-m", "no-such-method", "--out", str(out)]) == 2
    assert cli.main(["batch", str(csv), "-m", "mean", "-o", "bogus=1", "--out", str(out)]) == 2
    assert cli.main(["batch", str(tmp_path / "missing.csv"), "-m", "mean", "--out", str(out)]) == 2
    assert not out.exists()
    with pytest.raises(InputError, match="is the study folder itself"):
        batch.run_batch(tmp_path / "study", "mean", tmp_path / "study")
    out.mkdir()
    with batch._lock(out), pytest.raises(InputError, match="another batch is writing into this folder"):
        batch.run_batch(csv, "mean", out)


# ------------------------------------------------- killed and interrupted
SLOW_METHOD = """
import time
from bayesfuse.models import baselines

Config = baselines.Config


def fit(data, config=None, **kwargs):
    # Slow enough that the test can stop the batch between two subjects.
    time.sleep(1.5)
    return baselines.fit(data, config, **kwargs)
"""

DRIVER = """
import sys
from bayesfuse.models import ModelSpec, register

register(ModelSpec(name="slow-vote", module="slow_vote", summary="majority vote, slowly",
                   input="labels", pymc=False, defaults={"rule": "majority-vote"}))
from bayesfuse import cli

if __name__ == "__main__":  # the workers are spawned: they import this file too
    sys.exit(cli.main(sys.argv[1:]))
"""


def _batch_process(tmp_path: Path, csv: Path, out: Path) -> subprocess.Popen:
    (tmp_path / "slow_vote.py").write_text(textwrap.dedent(SLOW_METHOD))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    # The workers are spawned by the driver and find slow_vote through PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), "batch", str(csv), "-m", "slow-vote", "--out", str(out), "--workers", "1", "-q"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _first_subject_done(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not any((out / f"s{i:02d}").is_dir() for i in range(4)):
        if proc.poll() is not None:
            pytest.fail(f"the batch ended before the first subject was done: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no subject finished within {timeout} s")
        time.sleep(0.02)


def test_killed_batch_reruns_only_the_unfinished_subjects(tmp_path):
    csv = make_study(tmp_path / "study", 4)
    out = tmp_path / "out"
    proc = _batch_process(tmp_path, csv, out)
    _first_subject_done(proc, out)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, the scheduler and the worker, at once
    proc.wait(timeout=30)

    finished = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert 1 <= len(finished) <= 3
    first = {sid: assert_whole(out / sid)["run_id"] for sid in finished}

    proc = _batch_process(tmp_path, csv, out)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    summary = batch.read_summary(out)
    computed = sorted(summary.index[summary["status"] == "done"])
    assert sorted(summary.index[summary["status"] == "skipped"]) == finished
    assert computed == sorted(set(summary.index) - set(finished))
    records = {sid: assert_whole(out / sid) for sid in summary.index}
    assert {sid: records[sid]["run_id"] for sid in finished} == first
    assert len({records[sid]["run_id"] for sid in computed} - set(first.values())) == 1
    assert leftovers(out) == []
    assert (summary["dice"] > 0.8).all()


def test_ctrl_c_stops_the_command_without_half_written_subjects(tmp_path):
    csv = make_study(tmp_path / "study", 4)
    out = tmp_path / "out"
    proc = _batch_process(tmp_path, csv, out)
    _first_subject_done(proc, out)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    for sid in folders:
        assert_whole(out / sid)
    summary = batch.read_summary(out)
    assert sorted(summary.index[summary["status"] == "done"]) == folders
    assert set(summary["status"]) <= {"done", "pending"} and (summary["status"] == "pending").any()
