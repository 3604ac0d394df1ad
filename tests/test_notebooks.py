"""Every notebook in notebooks/ runs top to bottom on small settings (SPLINTERP_QUICK=1) without raising.

The LLM notebooks harvest MiniLM activations and train several SAEs, so even their quick settings take well
over 30 s on 2 CPU cores: they are marked slow (run with `pytest -m slow`).
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
