"""The HTML report: self-contained, sections driven by the result's schema,
slices through the structure, atomic and refusing to overwrite, and the
``report`` command. (The browser check is in test_report_browser.py.)"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from PIL import Image

from bayesfuse import api, figures, phantoms, report, summaries
from bayesfuse.cli import main
from bayesfuse.errors import OutputExistsError
from bayesfuse.result import FusionResult


class Page(HTMLParser):
    """What the tests look at in a report: images, tables, sections, links."""

    def __init__(self, text):
        super().__init__()
        self.images, self.tables, self.sections, self.external = [], [], [], []
        self._table = None
        self._row = None
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        for key in ("src", "href"):
            if key in a and not a[key].startswith(("data:", "#")):
                self.external.append(a[key])
        if tag in ("link", "script", "iframe", "object", "embed"):
            self.external.append(tag)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "table":
            self._table = {"class": a.get("class", ""), "rows": []}
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table["rows"].append(self._row)
            self._row = None
        elif tag == "table" and self._table is not None:
            self.tables.append(self._table)
            self._table = None

    def table(self, cls):
        return next(t for t in self.tables if t["class"] == cls)


def _decode(img):
    src = img["src"]
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


# ------------------------------------------------------------------ geometry
def test_slices_go_through_the_structure_not_the_volume_centre():
    vol = np.zeros((60, 50, 40))
    vol[40:50, 5:15, 30:36] = 1.0  # a box far from the centre
    c = figures.centre_of_mass(vol)
    assert c == (45, 10, 33) or np.allclose(c, (44.5, 9.5, 32.5), atol=0.6)
    box = figures.crop_box(vol)
    for ax, (lo, hi) in enumerate([(40, 50), (5, 15), (30, 36)]):
        assert box[ax].start <= lo and box[ax].stop >= hi
        assert box[ax].stop - box[ax].start < vol.shape[ax] or lo - figures.MIN_MARGIN <= 0
    # each plane shows the structure: the section through the centre holds it
    for p in figures.planes(3):
        sec = figures.cut(vol, p, c, box)
        assert sec.max() == 1.0
        # rows are the plane's vertical axis, columns its horizontal one
        assert sec.shape == (box[p.vertical].stop - box[p.vertical].start, box[p.horizontal].stop - box[p.horizontal].start)


def test_centre_of_mass_of_a_hollow_shape_lands_on_it():
    vol = np.zeros((41, 41))
    yy, xx = np.mgrid[:41, :41]
    ring = np.abs(np.hypot(xx - 20, yy - 20) - 15) < 1.5
    vol[ring] = 1
    c = figures.centre_of_mass(vol)
    # the plane through c (along each axis) meets the ring
    assert vol[c[0], :].any() and vol[:, c[1]].any()


# ------------------------------------------------------- a report by schema
@pytest.fixture(scope="module")
def phantom():
    return phantoms.make_phantom("outlier", shape=(40, 40, 28), random_seed=5)


def _schema_result(ph):
    """A result with every optional group a model may fill: a posterior sd
    (/maps), per-rater tau maps, components, responsibilities, an objective
    with one decrease. Built by hand so the report is tested on the schema,
    whatever models exist."""
    data = ph.raters
    p = data.n_raters
    fg = data.foreground().mean(axis=0)
    rng = np.random.default_rng(0)
    tau = rng.gamma(5, 1 / 5, size=data.shape + (p,)).astype(np.float32)
    comp = np.stack([fg, np.roll(fg, 3, axis=0)], axis=-1)
    resp = np.tile([[0.9, 0.1]], (p, 1))
    resp[-1] = [0.2, 0.8]
    obj = np.array([-100.0, -50.0, -40.0, -40.5, -39.0])
    r = FusionResult.build(
        method="mean", data=data, config={"note": "schema test"}, probability=fg,
        raters={"sensitivity": ("rater", np.linspace(0.7, 0.95, p)),
                "responsibility": (("rater", "component"), resp)},
        maps={"tau": (data.spatial_dims + ("rater",), tau),
              "components": (data.spatial_dims + ("component",), comp.astype(np.float32))},
        objective=obj, objective_name="ELBO", converged=True, stop_reason="tol",
    )
    return r


def test_report_follows_the_schema_and_is_self_contained(phantom, tmp_path):
    r = _schema_result(phantom)
    path = report.write_report(r, tmp_path, data=phantom.raters, command="bayesfuse fuse --method x --out y a b c")
    text = path.read_text()
    page = Page(text)
    assert page.external == []  # no link, script or non-data URL: opens offline
    assert page.sections == ["overview", "consensus", "map-tau", "map-components", "raters", "optimizer", "provenance"]
    # one image per figure: slices, tau, components, rater bars, responsibilities, objective
    assert len(page.images) == 6
    sizes = [_decode(img).size for img in page.images]
    assert all(w > 100 and h > 100 for w, h in sizes)
    # the slice grid has one row per quantity: image, consensus, entropy (a rule: no sd)
    assert "image" in text and "consensus p" not in page.external
    rows = page.table("raters")["rows"]
    assert [row[0] for row in rows[1:]] == phantom.raters.rater_names
    assert rows[0] == ["rater", "sensitivity", "responsibility_0", "responsibility_1"]
    np.testing.assert_allclose([float(row[1]) for row in rows[1:]], r.raters["sensitivity"], rtol=1e-3)
    kv = {row[0]: row[1] for t in page.tables if t["class"] == "kv" for row in t["rows"]}
    assert kv["converged"] == "yes" and kv["largest decrease"] == "0.5"
    assert kv["final ELBO"] == "-39"
    assert "bayesfuse fuse --method x --out y a b c" in text
    versions = {row[0]: row[2] for row in page.table("versions")["rows"][1:]}
    assert versions["numpy"] == np.__version__ and versions["xarray"] == xr.__version__
    assert not list(tmp_path.glob(".tmp-*"))


def test_report_of_an_em_model_shows_the_posterior_and_its_quantity(phantom, tmp_path):
    r = summaries.attach(api.fuse(phantom.raters, "pstaple"), mass=0.8)
    text = report.render(r, data=phantom.raters)
    page = Page(text)
    kv = {row[0]: row[1] for t in page.tables if t["class"] == "kv" for row in t["rows"]}
    assert kv["credible interval"] == "central (equal-tailed), mass 0.8"
    assert "label indicator" in kv["posterior summaries"]
    # sd under the factorised posterior: sqrt(sum w(1-w)) voxels, times the voxel volume
    w = r.consensus.values.astype(np.float64)
    expect = np.sqrt(np.sum(w * (1 - w))) * np.prod(phantom.raters.spacing) / 1000
    assert kv["volume sd under the factorised posterior"].startswith(f"{expect:.3g} mL")
    assert "80% interval width" in text or "80% central credible interval" in text


def test_report_refuses_to_overwrite_and_leaves_the_old_file(phantom, tmp_path):
    r = _schema_result(phantom)
    (tmp_path / "report.html").write_text("old")
    with pytest.raises(OutputExistsError, match="report.html: exists"):
        report.write_report(r, tmp_path)
    assert (tmp_path / "report.html").read_text() == "old"
    report.write_report(r, tmp_path, force=True)
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


# ---------------------------------------------------------------------- CLI
def _files(tmp_path, ph):
    paths = []
    for i, m in enumerate(ph.raters.maps.values):
        p = tmp_path / f"rater{i}.nii.gz"
        nib.save(nib.Nifti1Image(m, ph.raters.affine), str(p))
        paths.append(str(p))
    img = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(ph.raters.image.values, ph.raters.affine), str(img))
    return paths, str(img)


def test_fuse_report_and_report_command(phantom, tmp_path, capsys):
    paths, img = _files(tmp_path, phantom)
    out = tmp_path / "out"
    assert main(["fuse", "-m", "pstaple", "--report", "--out", str(out), "--image", img, "-q", *paths]) == 0
    first = (out / "report.html").read_text()
    assert "consensus_sd" not in Page(first).external
    assert len(Page(first).images) >= 3
    # the command and versions were stamped into result.nc, so a later report has them
    attrs = FusionResult.load(out).tree.attrs
    assert "fuse -m pstaple --report" in attrs["command"] and json.loads(attrs["versions"])["numpy"] == np.__version__
    # refuses before any work when only report.html is in the way
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.html").write_text("old")
    assert main(["fuse", "-m", "pstaple", "--report", "--out", str(other), "-q", *paths]) == 2
    assert "report.html: exists" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["report.html"]
    # the report command from the folder, with the image and the raters' contours
    assert main(["report", str(out), "--image", img, "--raters", *paths, "--force", "-q"]) == 0
    again = Page((out / "report.html").read_text())
    assert [row[0] for row in again.table("raters")["rows"][1:]] == [f"rater{i}.nii.gz" for i in range(len(paths))]
    assert "fuse -m pstaple --report" in (out / "report.html").read_text()


def test_report_command_bad_inputs(phantom, tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing: no such file" in err
    paths, img = _files(tmp_path, phantom)
    out = tmp_path / "out"
    assert main(["fuse", "-m", "mean", "--out", str(out), "-q", *paths]) == 0
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.eye(4)), str(small))
    assert main(["report", str(out), "--image", str(small)]) == 2
    err = capsys.readouterr().err
    assert "small.nii.gz: shape (5, 5, 5) differs" in err
    assert not (out / "report.html").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "result.nc").write_bytes(b"not a netcdf file")
    assert main(["report", str(tmp_path / "junk")]) == 2
    assert "cannot be read as a bayesfuse result" in capsys.readouterr().err
