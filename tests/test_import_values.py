"""Numbers an importer refuses: NaN, infinite or negative gate weights (at the first offending token and layer),
and counts that are negative, NaN or fractional in loads JSON and SGLang dumps; one error line, nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from placement.trace.dataset import TraceWriter
from placement.trace.importers import import_trace
from placement.trace.importers.popularity import read_loads
from placement.trace.schema import TraceError, check_counts
from placement.trace.synthetic import synthetic_trace


def _npz(path: Path, bad: float | None, at: tuple[int, int, int] = (17, 1, 1)) -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((50, 3, 2)).astype(np.float32)
    if bad is not None:
        scores[at] = bad
        scores[40, 2, 0] = bad  # a later one: the message names the first
    np.savez(path, routes=rng.integers(0, 8, (50, 3, 2)), scores=scores, num_experts=8, prompt_lens=[10, 40])


@pytest.mark.parametrize(("bad", "what"), [(np.nan, "NaN"), (np.inf, "infinite"), (-0.5, "negative")])
def test_bad_gate_weights_are_refused_at_the_first_position(cli, tmp_path: Path, bad: float, what: str) -> None:
    _npz(tmp_path / "a.npz", bad)
    code, out, err = cli("import", tmp_path / "a.npz", "--format", "npz", "--out", tmp_path / "ds")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in out + err
    # token 17 is prompt 1 (prompt_lens 10, 40), position 7; layer index 1 is model layer 1
    assert f"is {what} at token seq_id=1 token_pos=7, layer 1, top-k slot 1 (2 bad weights in all)" in lines[0]
    assert str(tmp_path / "a.npz") in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_good_gate_weights_pass(tmp_path: Path) -> None:
    _npz(tmp_path / "a.npz", None)
    assert import_trace(tmp_path / "a.npz", "npz", tmp_path / "ds") == 50 * 3


def test_writer_refuses_bad_gates_from_any_source(tmp_path: Path) -> None:
    meta, r = synthetic_trace(2, 4, 2, 10, seed=0)
    gates = np.ones((10, 2, 2), np.float64)
    gates[3, 0, 1] = 1e39  # beyond float32
    with pytest.raises(TraceError, match=r"too large for float32 at token seq_id=\d+ token_pos=\d+, layer 0"):
        TraceWriter(tmp_path / "ds", meta).write(r.expert_ids_TLK, r.seq_ids_T, r.token_pos_T, gates)


@pytest.mark.parametrize(
    ("value", "what"), [(-3, "negative"), (float("nan"), "NaN"), (2.5, "fractional"), (1e300, "infinite or too large")]
)
def test_loads_json_counts(tmp_path: Path, value: float, what: str) -> None:
    load = [[1, 2, 3, 4], [5, 6, 7, 8]]
    load[1][2] = value  # type: ignore[call-overload]
    for doc in (
        {"expert_popularity": load, "total_input_tokens": 9},
        {"kind": "moeplace.loads", "schema_version": 1, "model_name": "m", "layers": [0, 1], "load_LE": load},
    ):
        f = tmp_path / "l.json"
        f.write_text(json.dumps(doc))  # json writes NaN as NaN, which json.loads reads back
        with pytest.raises(TraceError, match=rf"^{f}: load_LE: count .* at layer 1, expert 2 is {what}"):
            read_loads(f)


def test_whole_float_counts_are_fine() -> None:
    np.testing.assert_array_equal(check_counts(np.array([[1.0, 0.0]]), "x", ("layer", "expert")), [[1, 0]])


def test_sglang_negative_counts(cli, tmp_path: Path) -> None:
    count = torch.ones(3, 4, 8, dtype=torch.int32)
    count[2, 1, 5] = -4
    torch.save({"rank": 0, "logical_count": count}, tmp_path / "s.pt")
    with pytest.raises(TraceError, match=r"logical_count: count -4 at step 2, layer 1, expert 5 is negative"):
        import_trace(tmp_path / "s.pt", "sglang", tmp_path / "l.json", loads_only=True)
    c = torch.zeros(4, 10, dtype=torch.int32)
    c[1, 3] = -1
    rec = dict(forward_pass_id=0, rank=0, gatherer_key="primary", global_physical_count=c)
    phy2log = torch.tensor([[p % 8 for p in range(10)]] * 4)
    torch.save({"records": [rec], "last_physical_to_logical_map": phy2log}, tmp_path / "p.pt")
    code, _, err = cli("import", tmp_path / "p.pt", "-f", "sglang", "--loads-only", "-o", tmp_path / "l.json")
    assert code == 1 and err.count("\n") == 1
    assert "records[0].global_physical_count: count -1 at layer 1, slot 3 is negative" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt", "s.pt"]
