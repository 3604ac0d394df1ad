"""Every notebook in notebooks/ runs top to bottom on small settings (SPLINTERP_QUICK=1) without raising.

Notebooks are stored without outputs; this executes them in memory with nbclient (nothing is written back).

Marked slow (run them with `pytest -m slow`) are those that take well over 30 s of CPU even with
SPLINTERP_QUICK=1, measured on 2 cores: 02 (the E1 job, ~90 s CPU), 03 (the E2 job plus a small SGD/PAM-SGD
run, ~40 s), 04 (MiniLM harvest, E3, projections), 05 (shrinkage sweep), 06 (Group-SAE). 01 and 07 (~10 s CPU
each) run in the default suite. The slow ones call the registered jobs that `splinterp reproduce --quick`
runs, so a lighter quick preset in an experiment module makes its notebook fast too.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SLOW = {"02_between_kmeans_and_pca", "03_mnist_pam_sgd", "04_llm_pam_sgd", "05_gated_shrinkage", "06_group_sae"}
ALL = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_are_stored_without_outputs():
    assert len(ALL) >= 7
    for name in ALL:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name} has stored outputs"
        src = "\n".join(c.source for c in nb.cells)
        assert "SPLINTERP_QUICK" in src, f"{name} does not read SPLINTERP_QUICK"


def _params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ALL]


@pytest.mark.parametrize("name", _params())
def test_notebook_runs(name, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("SPLINTERP_QUICK", "1")
    monkeypatch.setenv("SPLINTERP_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for var in ("SPLINTERP_SAE_FOLDER", "SPLINTERP_ACTIVATIONS"):
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell if any cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert os.listdir(tmp_path / "out")
