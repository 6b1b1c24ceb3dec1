"""examples/quickstart.ipynb runs from top to bottom on this venv's own kernel, from any directory, with public
names only."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KERNEL = "igea-test-venv"


@pytest.fixture()
def venv_kernel(tmp_path, monkeypatch) -> str:
    """A kernel spec that starts `sys.executable` (this venv), found first through JUPYTER_PATH."""
    write_kernel_spec(tmp_path / "kernels" / KERNEL)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable
    return KERNEL


@pytest.mark.slow
def test_quickstart_notebook_executes(venv_kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's run directory goes in a temporary directory
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    client = NotebookClient(nb, kernel_name=venv_kernel, timeout=300,  # from any directory, not only examples/
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, when a cell fails

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "Il fegato è " in printed and "La fibrosi cistica " in printed
    shown = [out.data for out in outputs if out.output_type == "display_data"]
    assert any("image/png" in data for data in shown)
    assert any(data.get("text/markdown", "").lstrip().startswith("# demo") for data in shown)


def test_quickstart_notebook_uses_public_names_only():
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert "from igea." not in code and "import igea." not in code and "../" not in code
