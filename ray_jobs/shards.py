"""Exactly-once bookkeeping of a sharded profiling job (plain Python: no Ray here).

A job splits its prompts into shards of consecutive prompt ids. Shard ``i`` is written by one writer (data
mode) or by every rank (expert mode) under deterministic writer ids (``shard{i:05d}`` or
``shard{i:05d}-r{rank}``), so a retried shard produces the same file names again. Files appear only after an
atomic rename (``TraceWriter``), and a shard counts as done only once the driver has recorded its files in
``_manifest.parquet`` (written atomically, by the driver alone). The manifest is the source of truth: before a
job (re)starts and before a shard is (re)written, every ``part-*.parquet`` file the manifest does not list is
deleted, so a worker that died after its rename but before the manifest update never leaves a duplicate.

Dimension key: P prompts of the job, N shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from placement.trace.dataset import (
    DATASET_FILE,
    MANIFEST_FILE,
    SHARD_GLOB,
    TraceWriter,
    metadata_file,
    read_metadata,
    write_metadata,
)
from placement.trace.outputs import OutputError
from placement.trace.outputs import check_output as check_writable
from placement.trace.schema import TraceError, TraceMeta

__all__ = [
    "MANIFEST",
    "JobKey",
    "Manifest",
    "ShardError",
    "ShardResult",
    "check_output",
    "make_shards",
    "prepare_output",
    "remove_unlisted",
    "trace_shard",
    "writer_id",
]

MANIFEST = MANIFEST_FILE
MANIFEST_VERSION = 1
_UNBUFFERED = 1 << 62  # rows: one Parquet file per writer and shard


class ShardError(ValueError):
    """Bad sharded-job input or output directory; the message is one line saying what to change."""


def make_shards(num_prompts: int, shard_size: int) -> list[tuple[int, ...]]:
    """Prompt ids of each shard: consecutive runs of ``shard_size`` ids (the last may be shorter)."""
    if num_prompts < 1:
        raise ShardError("no prompts to profile")
    if shard_size < 1:
        raise ShardError(f"shard size {shard_size}: must be >= 1")
    return [tuple(range(a, min(a + shard_size, num_prompts))) for a in range(0, num_prompts, shard_size)]


def writer_id(shard: int, rank: int | None = None) -> str:
    """Deterministic writer id of a shard (and rank, in expert mode)."""
    return f"shard{shard:05d}" if rank is None else f"shard{shard:05d}-r{rank}"


@dataclass(frozen=True)
class JobKey:
    """What must match for a job to resume into an existing output: model, prompts and sharding."""

    model_fingerprint: str
    prompts_sha256: str
    num_prompts: int
    shard_size: int
    max_len: int
    mode: str

    @classmethod
    def of(cls, meta: TraceMeta, prompts: Sequence[str], shard_size: int, max_len: int, mode: str) -> JobKey:
        h = hashlib.sha256()
        for p in prompts:
            data = p.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return cls(meta.fingerprint(), h.hexdigest(), len(prompts), shard_size, max_len, mode)


@dataclass
class Manifest:
    """``_manifest.parquet``: the job key and, per completed shard, its files and token count (JSON)."""

    key: JobKey
    num_shards: int
    completed: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": MANIFEST_VERSION,
                "key": asdict(self.key),
                "num_shards": self.num_shards,
                "completed": {writer_id(i): v for i, v in sorted(self.completed.items())},
            },
            indent=1,
        )

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            raw = json.loads(read_metadata(path))
            if raw.get("schema_version") != MANIFEST_VERSION:
                raise ShardError(f"{path}: manifest version {raw.get('schema_version')!r}, expected {MANIFEST_VERSION}")
            completed = {int(k.removeprefix("shard")): dict(v) for k, v in raw["completed"].items()}
            return cls(JobKey(**raw["key"]), int(raw["num_shards"]), completed)
        except ShardError:
            raise
        except TraceError as exc:  # a damaged metadata file: its own one-line message
            raise ShardError(str(exc)) from exc
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{path}: unreadable job manifest ({exc!r}); choose another --out") from exc

    def save(self, out_dir: Path) -> None:
        write_metadata(metadata_file(out_dir, MANIFEST), self.to_json())

    def listed_files(self) -> set[str]:
        return {f for v in self.completed.values() for f in v["files"]}

    def record(self, shard: int, result: ShardResult | Sequence[ShardResult]) -> None:
        parts = [result] if isinstance(result, ShardResult) else list(result)
        self.completed[shard] = {
            "files": sorted(f for r in parts for f in r.files),
            "tokens": sum(r.tokens for r in parts),
        }

    @property
    def tokens_done(self) -> int:
        return sum(int(v["tokens"]) for v in self.completed.values())


def check_output(out_dir: Path, meta: TraceMeta, key: JobKey) -> Manifest | None:
    """Read-only check that ``out_dir`` is new or a resumable output of the same job; returns its manifest.

    Raises ShardError (nothing touched) for another model's trace, another job's manifest, or shards without
    a manifest (a trace written by ``moeplace profile`` without ``--ray``).
    """
    try:
        check_writable(out_dir, kind="dataset")  # parent exists, a directory, writable (placement.trace.outputs)
    except OutputError as exc:
        raise ShardError(str(exc)) from None
    ds = metadata_file(out_dir, DATASET_FILE)
    if ds.exists():
        try:
            existing = TraceMeta.from_json(read_metadata(ds), where=str(ds))
        except TraceError as exc:
            raise ShardError(str(exc)) from exc
        if not existing.compatible_with(meta):
            raise ShardError(
                f"{out_dir}: holds a trace of another model ({existing.model_name}, E={existing.num_experts}, "
                f"K={existing.top_k}, {existing.num_layers} layers), not {meta.model_name}; choose another --out"
            )
    mpath = metadata_file(out_dir, MANIFEST)
    if not mpath.exists():
        if out_dir.is_dir() and any(out_dir.glob(SHARD_GLOB)):
            raise ShardError(
                f"{out_dir}: holds trace shards but no {MANIFEST} (not a Ray job output); choose another --out"
            )
        return None
    manifest = Manifest.read(mpath)
    if manifest.key != key:
        diff = [k for k, v in asdict(key).items() if asdict(manifest.key)[k] != v]
        raise ShardError(
            f"{out_dir}: holds a job with other {', '.join(diff)}; rerun with the same settings or choose another --out"
        )
    return manifest


def remove_unlisted(out_dir: Path, listed: set[str]) -> list[str]:
    """Delete shard files (and writers' temp files) the manifest does not list; returns the names removed."""
    removed = []
    for p in sorted(out_dir.glob(SHARD_GLOB)) + sorted(out_dir.glob(".part-*.tmp")):
        if p.name not in listed:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def prepare_output(out_dir: Path, meta: TraceMeta, key: JobKey, num_shards: int) -> Manifest:
    """Create or resume the output: ``_dataset.parquet``, the manifest, and no unlisted shard files."""
    manifest = check_output(out_dir, meta, key) or Manifest(key, num_shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not metadata_file(out_dir, DATASET_FILE).exists():
        write_metadata(out_dir / DATASET_FILE, meta.to_json())
    remove_unlisted(out_dir, manifest.listed_files())
    manifest.save(out_dir)
    return manifest


@dataclass(frozen=True)
class ShardResult:
    """What one writer produced for one shard: file names (relative to the dataset), tokens, seconds."""

    shard: int
    files: tuple[str, ...]
    tokens: int
    seconds: float


def trace_shard(
    out_dir: Path,
    meta: TraceMeta,
    shard: int,
    write: Callable[[TraceWriter], int],
    rank: int | None = None,
) -> ShardResult:
    """Write one shard's routing with ``write(writer) -> tokens`` under its deterministic writer id.

    Files of an earlier attempt of the same (shard, rank) are removed first, so a retry rewrites the same
    name instead of adding ``-000001``.
    """
    t0 = time.perf_counter()
    wid = writer_id(shard, rank)
    for p in out_dir.glob(f"part-{wid}-*.parquet"):
        p.unlink(missing_ok=True)
    with TraceWriter(out_dir, meta, wid, max_rows_buffered=_UNBUFFERED) as w:
        tokens = write(w)
    return ShardResult(shard, tuple(os.path.basename(p) for p in w.shards_written), tokens, time.perf_counter() - t0)
