"""Property-based tests over every reader of outside input: the importers (npz, SGLang dumps, Megatron JSONL), the
plan loader and the Parquet reader. Random and mutated inputs either read, or end in the project's own error
type with a one-line message; never another exception, never a partial output.

Profiles (tests/conftest.py): ``ci`` (CI=true: few examples, a deadline), ``dev`` (default) and ``long``
(``HYPOTHESIS_PROFILE=long``: the longer run of docs/testing.md).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from placement.plan import Plan, PlanError
from placement.trace.dataset import DATASET_FILE, open_trace, write_trace
from placement.trace.importers import import_trace
from placement.trace.schema import TraceError
from placement.trace.synthetic import synthetic_trace

FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        yield Path(d)


def _one_line(exc: BaseException) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg, repr(msg)


def _import_or_refuse(d: Path, src: Path, fmt: str, **kw: Any) -> None:
    """Import ``src``: either a readable dataset results, or a one-line TraceError and nothing but the source."""
    before = sorted(p.name for p in d.iterdir())
    out = d / "out"
    try:
        rows = import_trace(src, fmt, out, **kw)
    except TraceError as exc:
        _one_line(exc)
        assert sorted(p.name for p in d.iterdir()) == before  # no dataset, no staging directory left
        return
    assert rows >= 0
    if rows:
        t = open_trace(out)
        assert t.num_tokens * t.meta.num_layers == rows


# ------------------------------------------------------------------------------------------------------ npz

SIGNED = st.sampled_from([np.int8, np.int16, np.int32, np.int64])
ANY_DTYPES = st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.uint64, np.float32, np.float64, np.bool_])


def _arrays(dtypes: st.SearchStrategy[Any], max_dims: int = 3) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=5))


@st.composite
def npz_members(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """A routes array (mostly plausible) plus random optional members."""
    T, L, K = draw(st.integers(0, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    routes = draw(
        st.one_of(
            hnp.arrays(SIGNED, (T, L, K), elements=st.integers(-2, 9)),
            hnp.arrays(SIGNED, (T, L), elements=st.integers(-1, 9)),
            _arrays(ANY_DTYPES),
        )
    )
    members = {"routes": routes}
    shape = routes.shape
    optional = {
        "num_experts": st.one_of(st.integers(-3, 40).map(np.asarray), _arrays(ANY_DTYPES, 1)),
        "prompt_lens": st.one_of(
            st.just(np.asarray([shape[0]] if shape else [0])),
            _arrays(ANY_DTYPES, 2),
        ),
        "prompt_ids": _arrays(ANY_DTYPES, 1),
        "scores": st.one_of(
            hnp.arrays(np.float32, shape, elements=st.floats(-1, 2, width=32) | st.just(float("nan"))),
            _arrays(ANY_DTYPES),
        ),
        "layers": st.one_of(_arrays(ANY_DTYPES, 1), st.just(np.arange(shape[1] if len(shape) > 1 else 1))),
        "model_name": st.one_of(st.text(max_size=5).map(np.asarray), _arrays(ANY_DTYPES, 1)),
    }
    for key, strat in optional.items():
        if draw(st.booleans()):
            members[key] = draw(strat)
    return members


@FUZZ
@given(npz_members())
def test_npz_import_reads_or_refuses(members: dict[str, np.ndarray]) -> None:
    with _workdir() as d:
        np.savez(d / "src.npz", **members)  # type: ignore[arg-type]
        _import_or_refuse(d, d / "src.npz", "npz")


def _mutate(data: bytes, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """Flip, overwrite or cut bytes of a valid file."""
    kind = draw(st.sampled_from(["flip", "cut", "splice"]))
    if kind == "cut":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(buf) - 1))
        buf[i] = (buf[i] ^ (1 << draw(st.integers(0, 7)))) if kind == "flip" else draw(st.integers(0, 255))
    return bytes(buf)


def _valid_npz(path: Path) -> None:
    _, r = synthetic_trace(3, 8, 2, 20, tokens_per_prompt=5, seed=0)
    np.savez(path, routes=r.expert_ids_TLK, prompt_lens=[5] * 4, num_experts=8, scores=np.ones((20, 3, 2)))


@FUZZ
@given(st.data())
def test_mutated_npz_reads_or_refuses(data: st.DataObject) -> None:
    with _workdir() as d:
        _valid_npz(d / "ok.npz")
        (d / "src.npz").write_bytes(_mutate((d / "ok.npz").read_bytes(), data.draw))
        (d / "ok.npz").unlink()
        _import_or_refuse(d, d / "src.npz", "npz")


# ---------------------------------------------------------------------------------------------------- SGLang


def _tensors() -> st.SearchStrategy[Any]:
    import torch

    return _arrays(st.sampled_from([np.int32, np.int64, np.float32]), 3).map(torch.from_numpy)


def _values() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.integers(-3, 10), st.lists(st.integers(-2, 10), max_size=4), _tensors())


RECORD_KEYS = ["topk_ids_of_layer", "positions", "extend_seq_lens", "forward_pass_id", "global_physical_count",
               "rank", "forward_mode"]  # fmt: skip
DUMP_KEYS = ["records", "last_physical_to_logical_map", "logical_count", "rank", "dump_format"]


@st.composite
def sglang_dumps(draw: st.DrawFn) -> Any:
    record = st.dictionaries(st.sampled_from(RECORD_KEYS), _values(), max_size=6)
    dump = draw(st.dictionaries(st.sampled_from(DUMP_KEYS), _values(), max_size=5))
    if draw(st.booleans()):
        dump["records"] = draw(st.lists(st.one_of(record, _values()), max_size=3))
    return draw(st.one_of(st.just(dump), _values()))


@FUZZ
@given(sglang_dumps(), st.booleans())
def test_sglang_import_reads_or_refuses(dump: Any, loads_only: bool) -> None:
    import torch

    with _workdir() as d:
        torch.save(dump, d / "dump.pt")
        _import_or_refuse(d, d / "dump.pt", "sglang", loads_only=loads_only)


@FUZZ
@given(st.data())
def test_mutated_sglang_dump_reads_or_refuses(data: st.DataObject) -> None:
    import torch

    with _workdir() as d:
        topk = torch.randint(-1, 8, (3, 4, 2), dtype=torch.int32)
        rec = {"topk_ids_of_layer": topk, "positions": [0, 1, 2, 3], "extend_seq_lens": [4], "forward_pass_id": 0}
        torch.save({"records": [rec], "last_physical_to_logical_map": torch.arange(8).repeat(3, 1)}, d / "ok.pt")
        (d / "dump.pt").write_bytes(_mutate((d / "ok.pt").read_bytes(), data.draw))
        (d / "ok.pt").unlink()
        _import_or_refuse(d, d / "dump.pt", "sglang")


# -------------------------------------------------------------------------------------------------- Megatron

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 20), st.floats(allow_nan=False), st.text(max_size=3))
JSON = st.recursive(
    JSON_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=3), c, max_size=3), max_leaves=12
)


@st.composite
def megatron_lines(draw: st.DrawFn) -> str:
    def record() -> dict[str, Any]:
        T, K = draw(st.integers(0, 3)), draw(st.integers(1, 2))
        rec: dict[str, Any] = {
            "step": draw(st.integers(0, 2)),
            "layer": draw(st.integers(0, 2)),
            "topk": K,
            "top_indices": draw(st.lists(st.lists(st.integers(-1, 9), min_size=K, max_size=K), min_size=T, max_size=T)),
            "num_tokens": T,
        }
        for key in draw(st.lists(st.sampled_from([*rec, "block", "mtp_idx"]), max_size=2)):
            rec[key] = draw(JSON)  # a field with a random JSON value
        return rec

    lines = [json.dumps(record()) for _ in range(draw(st.integers(0, 6)))]
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=20).filter(lambda s: "\n" not in s)))
    return "\n".join(lines) + "\n"


@FUZZ
@given(megatron_lines(), st.none() | st.integers(-1, 12))
def test_megatron_import_reads_or_refuses(text: str, num_experts: int | None) -> None:
    with _workdir() as d:
        (d / "router_trace_rank0.jsonl").write_text(text)
        _import_or_refuse(d, d / "router_trace_rank0.jsonl", "megatron", num_experts=num_experts)


# ------------------------------------------------------------------------------------------------ plan loader


def _valid_plan() -> dict[str, Any]:
    phy = np.stack([np.random.default_rng(i).permutation(8) for i in range(3)])
    return json.loads(Plan(4, 1, 8, (0, 1, 2), phy, model_name="m").to_json())


@st.composite
def plan_documents(draw: st.DrawFn) -> str:
    doc = _valid_plan()
    for key in draw(st.lists(st.sampled_from([*doc, "extra"]), max_size=3)):
        doc[key] = draw(JSON | st.lists(st.lists(st.integers(-2, 10), max_size=9), max_size=4))
    if draw(st.booleans()):
        row, col = draw(st.integers(0, 2)), draw(st.integers(0, 7))
        if isinstance(doc.get("phy2log"), list) and len(doc["phy2log"]) > row and isinstance(doc["phy2log"][row], list):
            if len(doc["phy2log"][row]) > col:
                doc["phy2log"][row][col] = draw(st.integers(-3, 12) | JSON)
    return draw(st.one_of(st.just(json.dumps(doc)), JSON.map(json.dumps), st.text(max_size=30)))


@FUZZ
@given(plan_documents())
def test_plan_loader_reads_or_refuses(text: str) -> None:
    with _workdir() as d:
        (d / "plan.json").write_text(text)
        try:
            plan = Plan.load(d / "plan.json")
        except PlanError as exc:
            _one_line(exc)
            return
        L, P = plan.phy2log.shape
        assert L == len(plan.layers) and P % plan.num_gpus == 0 and P >= plan.num_experts
        assert plan.phy2log.min() >= 0 and plan.phy2log.max() < plan.num_experts
        assert Plan.from_json(plan.to_json()) == plan  # what loads, saves and loads again the same


# -------------------------------------------------------------------------------------------- Parquet reader


def _read_everything(path: Path) -> None:
    t = open_trace(path)
    r = t.read_all()
    assert r.expert_ids_TLK.shape[1:] == (t.meta.num_layers, t.meta.top_k)


def _read_or_refuse(path: Path) -> None:
    try:
        _read_everything(path)
    except TraceError as exc:
        _one_line(exc)


@pytest.fixture(scope="module")
def valid_dataset() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-ds-") as d:
        meta, r = synthetic_trace(3, 8, 2, 300, tokens_per_prompt=30, seed=0)
        write_trace(Path(d) / "ds", meta, r)
        yield Path(d) / "ds"


@FUZZ
@given(st.data())
def test_mutated_parquet_shard_reads_or_refuses(valid_dataset: Path, data: st.DataObject) -> None:
    shard = next(valid_dataset.glob("part-*.parquet"))
    with _workdir() as d:
        (d / "ds").mkdir()
        (d / "ds" / shard.name).write_bytes(_mutate(shard.read_bytes(), data.draw))
        _read_or_refuse(d / "ds" / shard.name)  # the shard alone
        meta_bytes = (valid_dataset / DATASET_FILE).read_bytes()  # the metadata file: intact or mutated
        (d / "ds" / DATASET_FILE).write_bytes(data.draw(st.sampled_from([meta_bytes, _mutate(meta_bytes, data.draw)])))
        _read_or_refuse(d / "ds")  # the dataset directory
        (d / "ds" / DATASET_FILE).unlink()  # a legacy JSON metadata file, intact or not
        meta_text = open_trace(valid_dataset).meta.to_json()
        (d / "ds" / "_dataset.json").write_text(data.draw(st.sampled_from([meta_text, meta_text[:20], "{}", "[]"])))
        _read_or_refuse(d / "ds")


@st.composite
def arrow_tables(draw: st.DrawFn) -> Any:
    """Tables in the trace schema with random column drops, type changes, list lengths and metadata."""
    import pyarrow as pa

    from placement.trace.schema import META_KEY, TraceMeta, arrow_schema

    T, L, K = draw(st.integers(0, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    meta = TraceMeta("m", 8, K, tuple(range(L)))
    R = T * L + draw(st.integers(-1, 1)) if T else 0
    R = max(R, 0)
    lens = [K + (draw(st.integers(-1, 1)) if draw(st.booleans()) else 0) for _ in range(R)]
    lens = [max(n, 0) for n in lens]
    ids = [draw(st.lists(st.integers(-3, 12), min_size=n, max_size=n)) for n in lens]
    cols = {
        "run_id": pa.array(["w"] * R),
        "seq_id": pa.array([i // L for i in range(R)], pa.int64()),
        "token_pos": pa.array([0] * R, pa.int32()),
        "layer": pa.array([draw(st.integers(-1, L)) if draw(st.booleans()) else i % L for i in range(R)], pa.int16()),
        "expert_ids": pa.array(ids, pa.list_(pa.int16())),
        "gate_weights": pa.array([[draw(st.floats(width=32)) for _ in range(n)] for n in lens], pa.list_(pa.float32())),
    }
    for name in draw(st.lists(st.sampled_from(list(cols)), max_size=2, unique=True)):
        if draw(st.booleans()):
            del cols[name]
        else:
            cols[name] = pa.array([str(i) for i in range(R)])
    md = draw(st.sampled_from([meta.to_json(), "{", json.dumps({"model_name": "m"}), None]))
    schema = arrow_schema(meta) if set(cols) == set(arrow_schema().names) else None
    table = pa.table(cols)
    if schema is not None:
        try:
            table = table.cast(schema)
        except (pa.ArrowException, ValueError):  # a column whose type cannot become the schema's
            pass
    return table.replace_schema_metadata({META_KEY: md} if md is not None else None)


@FUZZ
@given(arrow_tables())
def test_odd_parquet_tables_read_or_refuse(table: Any) -> None:
    import pyarrow.parquet as pq

    with _workdir() as d:
        pq.write_table(table, d / "part-x-000000.parquet")
        _read_or_refuse(d / "part-x-000000.parquet")
        _read_or_refuse(d)


def test_ci_profile_is_time_boxed() -> None:
    ci = settings.get_profile("ci")
    assert ci.max_examples <= 50 and ci.deadline is not None
    assert settings.get_profile("long").max_examples >= 1000


# ------------------------------------------------------------------ what the long run found (docs/testing.md)


def test_plan_number_beyond_int64_is_a_plan_error(tmp_path: Path) -> None:
    doc = _valid_plan()
    doc["phy2log"] = 9.223372036854776e18
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="phy2log"):
        Plan.load(tmp_path / "p.json")


@pytest.mark.parametrize(
    ("key", "value"),
    [("phy2log", "float"), ("num_gpus", 2.0), ("num_experts", True), ("layers", [0.5]), ("layers", 7)],
)
def test_plan_numbers_are_never_truncated(tmp_path: Path, key: str, value: object) -> None:
    """A float expert id (1.5) used to load as 1, num_gpus 2.0 as 2: integer fields hold JSON integers."""
    doc = _valid_plan()
    if value == "float":
        value = [[x + 0.5 for x in row] for row in doc["phy2log"]]
    doc[key] = value
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=key) as exc:
        Plan.load(tmp_path / "p.json")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("offset", "value", "why"), [(8, 1, "encrypted"), (10, 99, "compression")])
def test_npz_member_flags_a_reader_cannot_handle(tmp_path: Path, offset: int, value: int, why: str) -> None:
    """A zip entry marked encrypted, or compressed with an unknown method (a flipped header bit)."""
    _valid_npz(tmp_path / "ok.npz")
    buf = bytearray((tmp_path / "ok.npz").read_bytes())
    at = buf.index(b"PK\x01\x02") + offset  # the first central-directory entry
    buf[at] |= value
    (tmp_path / "ok.npz").unlink()
    (tmp_path / "bad.npz").write_bytes(bytes(buf))
    with pytest.raises(TraceError, match=rf"bad.npz.*{why}") as info:
        import_trace(tmp_path / "bad.npz", "npz", tmp_path / "out")
    _one_line(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


@pytest.mark.parametrize("layer", [32768, -1])
def test_layer_id_outside_the_int16_column(tmp_path: Path, layer: int) -> None:
    np.savez(tmp_path / "src.npz", routes=np.zeros((1, 1, 1), np.int8), layers=np.asarray([layer]))
    with pytest.raises(TraceError, match=r"model layer ids must lie in 0\.\.32767"):
        import_trace(tmp_path / "src.npz", "npz", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npz"]
