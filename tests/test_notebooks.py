"""The teaching notebooks run start to finish with small settings (issue 9).

Every ``notebooks/NN_name.py`` (jupytext percent format, kept as text without
outputs) is executed in a fresh kernel with ``BAYESFUSE_NOTEBOOK_SMALL=1``;
a failing cell (including the notebooks' own checks, which compare the
"by hand" cells with the library) fails the test, and every cell that calls
``plt.show()`` must have rendered a PNG. The real-data notebook runs on
``../shared/data`` where it exists; where it does not, it must skip cleanly
(it is run with an empty data folder to prove that) and the test says so.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _runner():
    spec = importlib.util.spec_from_file_location("notebook_runner", NOTEBOOKS / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


run = _runner()
#: Notebooks that read ../shared/data.
REAL_DATA = {"05_real_data.py"}
#: What the real-data notebook prints when it skips.
SKIP_MESSAGE = "real data not found"


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _check_figures(executed) -> None:
    figs = run.figure_cells(executed.notebook)
    assert figs, f"{executed.path.name} draws no figure (no cell calls plt.show())"
    blank = [i for i, has_png in figs if not has_png]
    assert not blank, f"{executed.path.name}: cells {blank} call plt.show() but rendered no PNG"


def test_the_teaching_notebooks_are_all_there():
    names = {p.name for p in run.notebooks()}
    for expected in ("01_staple_to_soft_staple.py", "02_robust_student_t.py", "03_mixture_of_consensuses.py",
                     "04_vb_against_nuts.py", "05_real_data.py"):
        assert expected in names, f"notebooks/{expected} is missing"


@pytest.mark.parametrize("path", run.notebooks(), ids=lambda p: p.stem)
def test_notebook_is_text_with_a_small_settings_parameter(path):
    import jupytext

    nb = jupytext.read(path)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", []), f"{path.name}: the first code cell is not tagged 'parameters'"
    assert run.SMALL_ENV in first_code.source, f"{path.name}: the parameters cell does not read {run.SMALL_ENV}"
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_no_executed_notebook_is_tracked():
    tracked = subprocess.run(["git", "ls-files", "notebooks"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    ipynb = [f for f in tracked.stdout.split() if f.endswith(".ipynb")]
    assert not ipynb, f"executed notebooks are tracked (keep text only): {ipynb}"


@pytest.mark.parametrize("path", [p for p in run.notebooks() if p.name not in REAL_DATA], ids=lambda p: p.stem)
def test_notebook_executes_with_small_settings(path):
    _check_figures(run.execute(path, small=True))


@pytest.mark.data
@pytest.mark.parametrize("path", [p for p in run.notebooks() if p.name in REAL_DATA], ids=lambda p: p.stem)
def test_real_data_notebook(path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} not run on real data: not found at {SHARED_DATA} "
                    "(its skip mode is tested by test_real_data_notebook_skips_cleanly_without_the_data)")
    executed = run.execute(path, small=True, env={"BAYESFUSE_SHARED_DATA": str(SHARED_DATA)})
    assert SKIP_MESSAGE not in _outputs_text(executed.notebook)
    _check_figures(executed)


@pytest.mark.parametrize("path", [p for p in run.notebooks() if p.name in REAL_DATA], ids=lambda p: p.stem)
def test_real_data_notebook_skips_cleanly_without_the_data(path, tmp_path):
    executed = run.execute(path, small=True, env={"BAYESFUSE_SHARED_DATA": str(tmp_path / "absent")})
    assert SKIP_MESSAGE in _outputs_text(executed.notebook), f"{path.name} did not say that it skipped"
