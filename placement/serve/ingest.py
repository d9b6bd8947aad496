"""Routing into the service: shards of the watched Parquet dataset and bodies of ``POST /v1/observations``,
turned into ``Counts`` (placement/serve/window.py).

Observation bodies, by Content-Type:

- ``application/vnd.apache.parquet`` (also ``application/x-parquet``): one trace shard, as ``moeplace profile``,
  ``moeplace import`` or a Ray job writes it (docs/trace_format.md);
- ``application/vnd.apache.arrow.stream`` / ``application/vnd.apache.arrow.file``: the same table as Arrow IPC;
- ``application/json``: totals of an engine that exports only counts (SGLang's expert-distribution recorder):
  ``{"num_tokens": T, "load_LE": [L][E], "trans_LEE": [L-1][E][E] (optional), "layers": [...] (optional)}``.
  With ``layers`` (the model layer id of each row), rows of layers outside the plan (dense layers) are dropped.
  Without ``num_tokens`` (SGLang ``stat`` dumps do not record it) it is the busiest layer's load / ``top_k``
  (from the body, else the model's as learnt from shards). So the loads JSON that ``moeplace import
  --format sglang --loads-only`` writes can be posted as it is.

Both tables go through the dataset reader of placement/trace/dataset.py, so a body is checked exactly like a shard.

Dimension key: L MoE layers, E experts.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from placement.graph import PROMPT_FOLDS, build_graph
from placement.plan import Plan
from placement.serve.window import (
    Counts,
    ObservationError,
    block_fold_loads,
    count_loads,
    few_prompts,
    graph_counts,
)
from placement.trace import dataset
from placement.trace.schema import TraceError, TraceMeta

log = logging.getLogger("moeplace.serve")

PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet", "application/parquet")
ARROW_TYPES = ("application/vnd.apache.arrow.stream", "application/vnd.apache.arrow.file")
JSON_TYPES = ("application/json",)


def check_model(meta: TraceMeta, plan: Plan, where: str) -> None:
    """Raise TraceError unless routing of ``meta`` is of the plan's model (name when both have one, expert count,
    MoE layer ids)."""
    named = bool(meta.model_name and plan.model_name)
    if (
        (named and meta.model_name != plan.model_name)
        or meta.num_experts != plan.num_experts
        or (tuple(meta.layers) != plan.layers)
    ):
        raise TraceError(
            f"{where}: routing of model {meta.model_name or '?'} (E={meta.num_experts}, {meta.num_layers} MoE "
            f"layers), the service plans {plan.model_name or '?'} (E={plan.num_experts}, {plan.num_layers} layers)"
        )


def shard_counts(path: Path, plan: Plan) -> tuple[Counts, int]:
    """(counts, top-k) of one trace shard; TraceError (one line) for a damaged shard or one of another model."""
    trace = dataset.open_parquet_trace(path)
    check_model(trace.meta, plan, path.name)
    g = build_graph(trace, with_coact=False, num_folds=PROMPT_FOLDS)  # streamed: memory bounded by a batch
    counts = graph_counts(g)
    if few_prompts(counts):  # sampled by token blocks instead (placement/serve/window.py), a second pass
        fold_SLE = block_fold_loads(trace.iter_batches(with_pos=False), trace.meta, g.num_tokens)
        counts = Counts(counts.num_tokens, counts.load_LE, counts.trans_LEE, fold_SLE)
    return counts, trace.meta.top_k


def pending_shards(watch: Path, done: set[str]) -> list[Path]:
    """Shards of the watched dataset not in ``done`` (names), oldest name first; with a job manifest only the
    shards it records as completed (a worker's file is part of the dataset once its job recorded it)."""
    if not watch.is_dir():
        return []
    shards = tuple(p for p in sorted(watch.glob(dataset.SHARD_GLOB)) if p.name not in done)
    return list(dataset._manifest_listed(watch, shards)) if shards else []


def observation_counts(
    body: bytes, content_type: str, plan: Plan, batch_id: int, tmp_dir: Path, top_k: int = 0
) -> tuple[Counts, int | None]:
    """(counts, top-k or None for JSON totals) of a posted observation; ObservationError or TraceError (one
    line) for a body that is not one."""
    kind = content_type.split(";")[0].strip().lower()
    if not body:
        raise ObservationError("empty body; send a Parquet shard, an Arrow IPC table or JSON counts")
    if kind in JSON_TYPES:
        return _json_counts(body, plan, batch_id, top_k), None
    if kind in PARQUET_TYPES:
        return _table_counts(body, plan, tmp_dir, arrow=False)
    if kind in ARROW_TYPES:
        return _table_counts(body, plan, tmp_dir, arrow=True)
    raise ObservationError(
        f"Content-Type {content_type!r}: send {PARQUET_TYPES[0]}, {ARROW_TYPES[0]} or application/json"
    )


def _table_counts(body: bytes, plan: Plan, tmp_dir: Path, arrow: bool) -> tuple[Counts, int]:
    """Check and count a Parquet or Arrow IPC body through the dataset reader (via a private temp shard)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=tmp_dir, prefix=".observation-", suffix=".parquet") as fh:
        if arrow:
            try:
                reader = pa.ipc.open_stream(body) if body[:6] != b"ARROW1" else pa.ipc.open_file(body)
                table = reader.read_all()
            except (pa.ArrowException, OSError) as exc:
                raise ObservationError(f"body is not an Arrow IPC table ({exc})") from None
            pq.write_table(table, fh.name)
        else:
            fh.write(body)
            fh.flush()
        try:
            return shard_counts(Path(fh.name), plan)
        except TraceError as exc:
            raise ObservationError(str(exc).replace(fh.name, "body").replace(Path(fh.name).name, "body")) from None


def _json_counts(body: bytes, plan: Plan, batch_id: int, top_k: int) -> Counts:
    try:
        d = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ObservationError(f"body is not JSON ({exc})") from None
    if not isinstance(d, dict) or "load_LE" not in d:
        raise ObservationError('JSON counts need "load_LE" ([L][E]) and "num_tokens"; "trans_LEE" is optional')
    num_tokens, top_k = d.get("num_tokens"), d.get("top_k") or top_k
    if num_tokens is None and not (isinstance(top_k, int) and top_k > 0):
        raise ObservationError('send "num_tokens" (or "top_k" to derive it from the loads)')
    if num_tokens is not None and (not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0):
        raise ObservationError(f'"num_tokens" = {num_tokens!r}: send the batch\'s token count (an integer >= 0)')
    load_LE = _array(d["load_LE"], "load_LE", 2)
    trans_LEE = None if d.get("trans_LEE") is None else _array(d["trans_LEE"], "trans_LEE", 3)
    if d.get("layers") is not None:
        load_LE, trans_LEE = _select_layers(d["layers"], load_LE, trans_LEE, plan.layers)
    L, E = plan.num_layers, plan.num_experts
    if load_LE.shape != (L, E):
        raise ObservationError(f'"load_LE" has shape {list(load_LE.shape)}, this model needs [{L}, {E}]')
    if trans_LEE is not None and trans_LEE.shape != (L - 1, E, E):
        raise ObservationError(f'"trans_LEE" has shape {list(trans_LEE.shape)}, this model needs [{L - 1}, {E}, {E}]')
    if num_tokens is None:
        num_tokens = round(float(load_LE.sum(axis=1).max()) / top_k) if load_LE.size else 0
    return count_loads(num_tokens, load_LE, trans_LEE, batch_id)


def _array(value: object, name: str, ndim: int) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ObservationError(f'"{name}" is not a rectangular array of numbers') from None
    if a.ndim != ndim:
        raise ObservationError(f'"{name}" has {a.ndim} dimensions, expected {ndim}')
    if a.size and not (np.isfinite(a).all() and a.min() >= 0):
        raise ObservationError(f'"{name}" holds negative or non-finite counts; send counts >= 0')
    return a


def _select_layers(
    layers: object, load_LE: np.ndarray, trans_LEE: np.ndarray | None, moe_layers: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of the plan's MoE layers, from counts whose rows are the model layers ``layers``."""
    if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers) or len(layers) != len(load_LE):
        raise ObservationError(f'"layers" must list the model layer id of each of the {len(load_LE)} rows of load_LE')
    row_of = {lid: r for r, lid in enumerate(layers)}
    missing = [lid for lid in moe_layers if lid not in row_of]
    if missing:
        raise ObservationError(f'"layers" lacks MoE layers {missing[:5]} of this model; send a row for each')
    rows = np.array([row_of[lid] for lid in moe_layers])
    if trans_LEE is not None and not (np.diff(rows) == 1).all():
        raise ObservationError('"trans_LEE" with "layers" needs the MoE layers as consecutive rows')
    return load_LE[rows], None if trans_LEE is None else trans_LEE[rows[:-1]]


class Watcher:
    """A daemon thread that calls ``step`` every ``period`` seconds until ``stop``; an error in one step is
    logged and the next step runs (a bad shard must not stop ingestion)."""

    def __init__(self, step: Callable[[], None], period: float, name: str = "moeplace-watch") -> None:
        self._step = step
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:
                log.exception("watcher step failed; retrying in %.1f s", self._period)
            self._stop.wait(self._period)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to stop and wait for the step in progress to finish."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
