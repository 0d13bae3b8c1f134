"""Execute the teaching notebooks (kept as jupytext percent-format text).

    python notebooks/run.py                 # every notebook, full settings
    python notebooks/run.py --small         # small settings (what the tests run)
    python notebooks/run.py --small 01 --out /tmp/executed   # keep the executed .ipynb

Each notebook reads the environment variable ``BAYESFUSE_NOTEBOOK_SMALL``
in its first code cell (tagged ``parameters``): ``1`` selects small
problems and few draws (well under a minute), anything else the full
settings (a few minutes on 2 cores). The executed notebooks are written only
where ``--out`` says, never into ``notebooks/``: the repository keeps text
without outputs. ``tests/test_notebooks.py`` uses :func:`execute`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The parameter every notebook reads.
SMALL_ENV = "BAYESFUSE_NOTEBOOK_SMALL"
#: Longest a single cell may run (seconds) before the run fails.
CELL_TIMEOUT = 1200


def notebooks() -> list[Path]:
    """The teaching notebooks, in reading order (``NN_name.py``)."""
    return sorted(HERE.glob("[0-9][0-9]_*.py"))


@dataclass
class Executed:
    path: Path
    notebook: object  # nbformat.NotebookNode, with outputs
    seconds: float


def execute(path: Path, *, small: bool, env: dict[str, str] | None = None, timeout: int = CELL_TIMEOUT) -> Executed:
    """Run a notebook start to finish in a fresh kernel; a failing cell raises
    ``nbclient.exceptions.CellExecutionError`` naming the cell.

    Parameters
    ----------
    path : Path
        A ``notebooks/NN_name.py`` file.
    small : bool
        Sets ``BAYESFUSE_NOTEBOOK_SMALL`` for the kernel.
    env : dict, optional
        More environment variables for the kernel (e.g.
        ``BAYESFUSE_SHARED_DATA``).
    """
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    kernel_env = {**os.environ, **(env or {}), SMALL_ENV: "1" if small else "0"}
    # the kernel draws figures as PNG (inline backend), whatever the caller's MPLBACKEND
    kernel_env.pop("MPLBACKEND", None)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute(env=kernel_env)
    return Executed(path, nb, time.perf_counter() - t0)


def figure_cells(nb) -> list[tuple[int, bool]]:
    """(cell index, has a PNG output) for every code cell that calls ``plt.show()``."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "plt.show()" in cell.source:
            has_png = any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))
            out.append((i, has_png))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="notebook file names or prefixes (default: all)")
    p.add_argument("--small", action="store_true", help="small settings (BAYESFUSE_NOTEBOOK_SMALL=1)")
    p.add_argument("--out", type=Path, help="folder for the executed .ipynb files (outside notebooks/)")
    args = p.parse_args(argv)
    chosen = [nb for nb in notebooks() if not args.names or any(nb.name.startswith(n) for n in args.names)]
    if not chosen:
        p.error(f"no notebook matches {args.names}")
    if args.out and args.out.resolve() == HERE:
        p.error("--out must not be notebooks/: the repository keeps the notebooks as text without outputs")
    import nbformat

    for path in chosen:
        run = execute(path, small=args.small)
        figs = figure_cells(run.notebook)
        print(f"{path.name}: {run.seconds:.1f} s ({'small' if args.small else 'full'} settings), "
              f"{sum(h for _, h in figs)}/{len(figs)} figure cells rendered", flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            nbformat.write(run.notebook, args.out / path.with_suffix(".ipynb").name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
