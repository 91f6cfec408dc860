"""notebooks/quickstart.ipynb, executed cell by cell in a fresh Jupyter kernel (nbclient) with its
small settings (``INFINITEVL_NOTEBOOK_SMALL=1``), so the Colab quickstart cannot rot: every cell
must run without an error and print what the notebook promises (training metrics, streamed and
generated answers, and the two logit comparisons of the export step)."""

from __future__ import annotations

import math
import os
import re
import time

import pytest

nbclient = pytest.importorskip("nbclient")
import nbformat  # noqa: E402  (installed with nbclient)

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "quickstart.ipynb")


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _printed(cell) -> str:
    """Everything a code cell wrote to stdout / stderr, and its text results."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_committed_notebook_is_clean_and_parametrised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = _code_cells(nb)
    assert all(not cell.outputs and cell.execution_count is None for cell in code), \
        "commit the notebook without outputs"
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and "INFINITEVL_NOTEBOOK_SMALL" in tagged[0].source
    modules = re.findall(r"^\s*(?:from|import) (\S+)", "\n".join(c.source for c in code), re.M)
    assert modules and not any(m.split(".")[0] == "tests" for m in modules)  # Colab has no tests/ folder


def test_quickstart_notebook_runs_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINITEVL_NOTEBOOK_SMALL", "1")
    # the kernel inherits this environment: one CPU device as on a Colab CPU runtime, not the eight
    # simulated devices tests/conftest.py gives the test processes
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error
    seconds = time.perf_counter() - start

    code = _code_cells(nb)
    assert all(output.output_type != "error" for cell in code for output in cell.outputs)
    printed = "\n".join(_printed(cell) for cell in code)
    assert "infinitevl_jax is already installed" in printed  # the pip cell is skipped
    assert "SMALL = True, 3 training steps" in printed
    assert "student layers: ('sliding_attention', " + ", ".join(["'linear_attention'"] * 3) + ")" in printed
    assert "trained 3 steps" in printed
    losses = [float(x) for x in re.findall(r"^step +\d+ +loss (\S+)", printed, re.M)]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss >= 0 for loss in losses)  # KL values
    assert "stream A:" in printed and "generate A:" in printed
    assert "model_type: infinite_vl" in printed
    student = re.search(r"student logits, trained run vs its export: max \|difference\| = (\S+)", printed)
    teacher = re.search(r"teacher logits, JAX vs PyTorch .*: max \|difference\| = (\S+)", printed)
    assert student and float(student.group(1)) == 0.0
    assert teacher and float(teacher.group(1)) < 1e-3
    assert (tmp_path / "infinitevl_quickstart" / "export-teacher" / "config.json").is_file()
    print(f"notebook executed in {seconds:.0f} s")
