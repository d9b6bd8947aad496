"""notebooks/analysis.ipynb runs top to bottom in a real ipykernel (nbclient) on its default trace (the shipped
demo MoE, profiled in the notebook), and its synthetic-trace fallback builds a valid trace."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"


def _code_cells() -> list[Any]:
    import nbformat

    return [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]


def test_notebook_is_clean_and_has_a_parameters_cell() -> None:
    code = _code_cells()
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "TRACE" in code[0].source
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"


def test_notebook_runs_top_to_bottom(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import nbclient
    import nbformat

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's work directory lands here
    monkeypatch.setenv("MOEPLACE_NOTEBOOK_TRACE", os.environ.get("MOEPLACE_NOTEBOOK_TRACE", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", allow_errors=False).execute()
    out = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )
    assert "report:" in out and "--init-expert-location" in out
    if not os.environ.get("MOEPLACE_NOTEBOOK_TRACE"):
        assert "moeplace-demo-moe" in out or "synthetic-moe" in out


def test_synthetic_trace_parameter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The first two code cells with TRACE="synthetic", run in-process (no kernel): a valid trace and graph."""
    monkeypatch.setenv("MOEPLACE_NOTEBOOK_TRACE", "synthetic")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    ns: dict[str, Any] = {}
    for cell in _code_cells()[:2]:
        exec(compile(cell.source, str(NOTEBOOK), "exec"), ns)
    assert ns["meta"].model_name == "synthetic-moe" and Path(ns["WORK"]).parent == tmp_path
    assert ns["graph"].num_tokens == 4000 and ns["graph"].trans_LEE.sum() > 0
