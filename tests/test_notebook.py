"""notebooks/analysis.ipynb runs top to bottom (nbclient, a real ipykernel), on its synthetic trace and on a
real shared trace passed through its TRACE parameter."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
REAL_TRACE = REPO.parent / "shared" / "traces" / "mixtral-8x7b-instruct.humaneval0.npz"


def _execute(monkeypatch: pytest.MonkeyPatch, trace: str) -> str:
    import nbclient
    import nbformat

    monkeypatch.setenv("MOEPLACE_NOTEBOOK_TRACE", trace)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", allow_errors=False).execute()
    return "\n".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )


def test_notebook_is_clean_and_has_a_parameters_cell() -> None:
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "TRACE" in code[0].source
    assert all(not c.outputs and c.execution_count is None for c in code), (
        "commit the notebook without outputs"
    )


def test_notebook_runs_on_its_synthetic_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _execute(monkeypatch, "")
    assert "synthetic-moe" in out and "report:" in out and "--init-expert-location" in out


@pytest.mark.slow
@pytest.mark.skipif(not REAL_TRACE.exists(), reason=f"shared trace {REAL_TRACE} not present")
def test_notebook_runs_on_a_real_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _execute(monkeypatch, f"{REAL_TRACE}:prefill")
    assert "mixtral-8x7b-instruct" in out and "report:" in out
