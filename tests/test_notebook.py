"""docs/walkthrough.ipynb runs top to bottom without an error (needs the `notebook` extra)."""

import pytest
from conftest import ROOT

nbclient = pytest.importorskip("nbclient", reason='the notebook test needs pip install -e ".[notebook]"')
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"


@pytest.mark.slow
def test_the_walkthrough_runs_top_to_bottom(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError at the first cell that fails
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells and all(cell.outputs for cell in code_cells)  # every cell showed something
    assert not any(out.output_type == "error" for cell in code_cells for out in cell.outputs)
    shown = "".join(out.get("text", "") for cell in code_cells for out in cell.outputs)
    assert "bitwise equal to jax.grad" in shown and "invented:" in shown


def test_the_committed_notebook_holds_its_outputs():
    """It reads on a code host without running: every code cell was executed and kept its output."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count and cell.outputs for cell in code_cells)
    assert not any(out.output_type == "error" for cell in code_cells for out in cell.outputs)
