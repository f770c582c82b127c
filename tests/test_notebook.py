"""The quickstart notebook runs top to bottom (nbclient), with a small random backbone for speed."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs one cell tagged 'parameters'"
    params[0].source = f'BACKBONE = "resnet18.none"\nINPUT_SIZE = 32\nWORK = {str(tmp_path / "nb")!r}'
    for cell in nb.cells:
        assert not cell.get("outputs"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "cache hit: True" in text
    assert "val top-1" in text and "shots per class" in text
    assert (tmp_path / "nb" / "report.html").is_file() and (tmp_path / "nb" / "model.pt2").is_file()
