"""Driver of a Ray profiling job: the only moeplace code that calls ``ray.init``.

``run_job(cfg)`` checks everything it can before touching the output (prompts, model, output directory, Ray
address, cluster capacity), then prepares the output (``_dataset.parquet``, ``_manifest.parquet``, no stray shard
files), starts the workers in one placement group, submits every pending shard at once and records each
finished shard in the manifest as it arrives. A resumed job skips the shards the manifest lists.

Fault tolerance: data-parallel workers restart (``max_restarts``) and their queued shards retry
(``max_task_retries``). Expert-parallel ranks cannot rejoin a broken process group one by one, so when any
rank fails the driver kills the group and starts a new one (``group_restarts`` times) on the shards not done.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_jobs.shards import (
    JobKey,
    Manifest,
    ShardError,
    ShardResult,
    check_output,
    make_shards,
    prepare_output,
    remove_unlisted,
)

__all__ = ["MODES", "JobConfig", "JobProgress", "JobResult", "RayJobError", "run_job"]

MODES = ("data", "expert")


class RayJobError(RuntimeError):
    """The job could not run or finish; the message is one line saying what to do."""


@dataclass(frozen=True)
class JobConfig:
    """One profiling job. ``address`` None: ``RAY_ADDRESS`` if set (as under ``ray job submit``), else an
    embedded local Ray with ``num_cpus`` CPUs. ``shard_size`` None: ``batch_size`` prompts per shard in data mode,
    ``batch_size * workers`` in expert mode (one batch per rank and shard)."""

    out: Path
    model: str = "builtin"
    prompts: str = "builtin"
    limit: int | None = None
    workers: int = 2
    mode: str = "data"
    address: str | None = None
    shard_size: int | None = None
    batch_size: int = 8
    max_len: int = 256
    cpus_per_worker: float = 1.0
    threads: int = 1
    num_cpus: int = 2
    max_restarts: int = 3
    group_restarts: int = 2
    placement_timeout_s: float = 60.0
    start_timeout_s: float = 300.0

    @property
    def prompts_per_shard(self) -> int:
        if self.shard_size is not None:
            return self.shard_size
        return self.batch_size * (self.workers if self.mode == "expert" else 1)


@dataclass(frozen=True)
class JobProgress:
    shards_done: int
    shards_total: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class JobResult:
    """``tokens``: traced by this run (resumed shards excluded); ``seconds``: from workers up to the end;
    ``startup_s``: Ray connect/start plus workers ready, ``connect_s`` the first part alone."""

    out: Path
    shards_total: int
    shards_run: int
    tokens: int
    rows: int
    seconds: float
    startup_s: float
    worker_pids: tuple[int, ...]
    connect_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


ProgressFn = Callable[[JobProgress], None]
PidsFn = Callable[[list[int]], None]


def validate(cfg: JobConfig) -> None:
    if cfg.mode not in MODES:
        raise RayJobError(f"--mode {cfg.mode!r}: use one of {', '.join(MODES)}")
    if cfg.workers < 1 or cfg.threads < 1 or cfg.cpus_per_worker <= 0:
        raise RayJobError("--workers and --threads must be >= 1, --cpus-per-worker > 0")
    size = cfg.prompts_per_shard
    if size < 1 or cfg.batch_size < 1 or cfg.max_len < 1:
        raise RayJobError("--shard-size, --batch-size and --max-len must be >= 1")
    if size % cfg.batch_size:
        raise RayJobError(f"--shard-size {size} must be a multiple of --batch-size {cfg.batch_size}")


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an unreachable ``host:port`` (``ray.init`` retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayJobError(
            f"Ray address {address} is unreachable ({exc.strerror or exc}); start a head with "
            "'ray start --head' or pass the head's --address"
        ) from exc


def cluster_address(cfg: JobConfig) -> str | None:
    """The cluster ``connect`` joins: ``cfg.address``, else ``RAY_ADDRESS``; None: it starts an embedded Ray."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def connect(cfg: JobConfig) -> str:
    """Connect to the cluster (or start an embedded one); returns a description.

    ``run_job`` calls it unless the process is already connected (``ray.is_initialized()``): a library caller
    or a test may connect once with this function and run several jobs on that connection.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cluster_address(cfg)
    if address is None:  # "local": always a new cluster, never one that another user started on this machine
        _quiet_token_auth()
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
        )
        return f"local Ray ({cfg.num_cpus} CPUs)"
    _probe(address)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayJobError(f"cannot connect to Ray at {address}: {str(exc).strip().splitlines()[0]}") from exc
    return f"Ray at {address}"


def _quiet_token_auth() -> None:
    """Keep Ray's default for a new local cluster, token authentication (token in ~/.ray/auth_token, made on
    first use), without the warning Ray prints to users while ``RAY_AUTH_MODE`` is unset: set it to ``token``
    as ``ray.init`` itself would, and refresh Ray's cached config as Ray does. An explicit setting is kept."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    from ray._raylet import Config  # type: ignore[attr-defined]

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def _placement_group(cfg: JobConfig) -> Any:
    """A placement group of one bundle per worker; raises if the cluster cannot hold it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    total = ray.cluster_resources().get("CPU", 0.0)
    need = cfg.workers * cfg.cpus_per_worker
    if need > total:
        raise RayJobError(
            f"--workers {cfg.workers} need {need:g} CPUs but the cluster has {total:g}; "
            "use fewer workers, smaller --cpus-per-worker, or a bigger cluster"
        )
    strategy = "SPREAD" if cfg.mode == "expert" else "PACK"
    pg = placement_group([{"CPU": cfg.cpus_per_worker}] * cfg.workers, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=cfg.placement_timeout_s)
    if not ready:
        remove_placement_group(pg)
        free = ray.available_resources().get("CPU", 0.0)
        raise RayJobError(
            f"could not place {cfg.workers} workers within {cfg.placement_timeout_s:g} s ({free:g} of {total:g} "
            "CPUs free); use fewer workers or wait for other jobs"
        )
    return pg


def run_job(cfg: JobConfig, on_progress: ProgressFn | None = None, on_pids: PidsFn | None = None) -> JobResult:
    """Run (or resume) a profiling job; see the module docstring."""
    from profiler.api import load_model, load_prompts

    validate(cfg)
    texts = load_prompts(cfg.prompts)
    if cfg.limit is not None:
        texts = texts[: cfg.limit]
    meta = load_model(cfg.model).trace_meta()
    out = cfg.out.resolve()
    key = JobKey.of(meta, texts, cfg.prompts_per_shard, cfg.max_len, cfg.mode)
    shards = make_shards(len(texts), cfg.prompts_per_shard)
    existing = check_output(out, meta, key)  # read-only: bad output fails before Ray starts
    if cfg.mode == "expert" and cfg.model != "builtin":
        raise RayJobError(f"--mode expert supports --model builtin only, not {cfg.model!r}; use --mode data")
    if cfg.mode == "expert" and meta.num_experts % cfg.workers:
        raise RayJobError(f"--mode expert: {meta.num_experts} experts do not split over {cfg.workers} workers")

    if existing is not None and len(existing.completed) == len(shards):
        rows = existing.tokens_done * meta.num_layers
        return JobResult(out, len(shards), 0, 0, rows, 0.0, 0.0, ())

    import ray
    from ray.util.placement_group import remove_placement_group

    t0 = time.perf_counter()
    address = cluster_address(cfg)
    if address is not None:
        _probe(address)  # fail fast even when a connection is reused
    owns = not ray.is_initialized()
    if owns:
        connect(cfg)
    connect_s = time.perf_counter() - t0
    pg = None
    manifest: Manifest | None = None
    try:
        pg = _placement_group(cfg)
        manifest = prepare_output(out, meta, key, len(shards))
        todo = [i for i in range(len(shards)) if i not in manifest.completed]
        run = _run_expert if cfg.mode == "expert" else _run_data
        tokens, seconds, startup, pids = run(cfg, pg, texts, out, shards, todo, manifest, on_progress, on_pids)
    finally:
        if manifest is not None:  # files of unfinished shards never count; drop them now (resume does too)
            remove_unlisted(out, manifest.listed_files())
        if pg is not None:
            remove_placement_group(pg)
        if owns:
            ray.shutdown()
    rows = sum(int(v["tokens"]) for v in manifest.completed.values()) * meta.num_layers
    return JobResult(out, len(shards), len(todo), tokens, rows, seconds, startup - t0, tuple(pids), connect_s)


def _strategy(pg: Any, index: int) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def _args(cfg: JobConfig, out: Path) -> tuple[Any, ...]:
    return (cfg.model, str(out), cfg.batch_size, cfg.max_len, cfg.threads)


class _Tracker:
    """Records finished shards in the manifest and reports progress."""

    def __init__(self, out: Path, manifest: Manifest, on_progress: ProgressFn | None) -> None:
        self.out, self.manifest, self.on_progress = out, manifest, on_progress
        self.tokens = 0
        self.t0 = time.perf_counter()

    def done(self, shard: int, parts: list[ShardResult]) -> None:
        self.manifest.record(shard, parts)
        self.manifest.save(self.out)
        self.tokens += sum(p.tokens for p in parts)
        if self.on_progress is not None:
            self.on_progress(
                JobProgress(
                    len(self.manifest.completed), self.manifest.num_shards, self.tokens, time.perf_counter() - self.t0
                )
            )


def _fail_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _run_data(
    cfg: JobConfig,
    pg: Any,
    texts: list[str],
    out: Path,
    shards: list[tuple[int, ...]],
    todo: list[int],
    manifest: Manifest,
    on_progress: ProgressFn | None,
    on_pids: PidsFn | None,
) -> tuple[int, float, float, list[int]]:
    import ray

    from ray_jobs.actors import ProfileWorker

    workers = [
        ProfileWorker.options(  # type: ignore[attr-defined]
            num_cpus=cfg.cpus_per_worker,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_restarts,
            scheduling_strategy=_strategy(pg, w),
        ).remote(*_args(cfg, out))
        for w in range(cfg.workers)
    ]
    try:
        pids = ray.get([w.pid.remote() for w in workers], timeout=cfg.start_timeout_s)
        startup = time.perf_counter()
        if on_pids is not None:
            on_pids(pids)
        tracker = _Tracker(out, manifest, on_progress)
        pending = {
            workers[n % len(workers)].run_shard.remote(i, shards[i], [texts[p] for p in shards[i]]): i
            for n, i in enumerate(todo)
        }
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(ready[0])
            try:
                tracker.done(shard, [ray.get(ready[0])])
            except (ray.exceptions.RayError, ProcessLookupError) as exc:
                raise RayJobError(
                    f"shard {shard} failed after {cfg.max_restarts} retries ({_fail_line(exc)}); "
                    "rerun the same command to resume"
                ) from exc
    except ray.exceptions.GetTimeoutError as exc:
        raise RayJobError(f"workers were not ready within {cfg.start_timeout_s:g} s; check 'ray status'") from exc
    finally:
        for w in workers:
            ray.kill(w)
    return tracker.tokens, time.perf_counter() - tracker.t0, startup, pids


def _start_group(cfg: JobConfig, pg: Any, out: Path) -> tuple[list[Any], list[int]]:
    import ray

    from placement.runtime.launch import free_port
    from ray_jobs.actors import EPWorker

    ranks = [
        EPWorker.options(  # type: ignore[attr-defined]
            num_cpus=cfg.cpus_per_worker, max_restarts=0, scheduling_strategy=_strategy(pg, r)
        ).remote(*_args(cfg, out))
        for r in range(cfg.workers)
    ]
    try:
        ips = ray.get([r.node_ip.remote() for r in ranks], timeout=cfg.start_timeout_s)
        local = len(set(ips)) == 1 and ips[0] == ray.util.get_node_ip_address()
        addr = "127.0.0.1" if local else ips[0]
        port = free_port() if local else ray.get(ranks[0].free_port.remote())
        joins = [r.join.remote(i, cfg.workers, addr, port, "gloo") for i, r in enumerate(ranks)]
        ray.get(joins, timeout=cfg.start_timeout_s)
        return ranks, ray.get([r.pid.remote() for r in ranks], timeout=cfg.start_timeout_s)
    except BaseException as exc:
        for r in ranks:
            ray.kill(r)
        if isinstance(exc, ray.exceptions.GetTimeoutError):
            raise RayJobError(
                f"expert-parallel group did not form within {cfg.start_timeout_s:g} s; check 'ray status'"
            ) from exc
        raise


def _drain(refs: list[Any]) -> None:
    """Collect the outcome of every ref of a killed group, so Ray does not report them as unhandled errors."""
    import ray

    for ref in refs:
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(ref, timeout=30)


def _run_expert(
    cfg: JobConfig,
    pg: Any,
    texts: list[str],
    out: Path,
    shards: list[tuple[int, ...]],
    todo: list[int],
    manifest: Manifest,
    on_progress: ProgressFn | None,
    on_pids: PidsFn | None,
) -> tuple[int, float, float, list[int]]:
    import ray

    tracker: _Tracker | None = None
    startup = 0.0
    all_pids: list[int] = []
    for attempt in range(cfg.group_restarts + 1):
        left = [i for i in todo if i not in manifest.completed]
        if not left:
            break
        ranks, pids = _start_group(cfg, pg, out)
        all_pids += pids
        if tracker is None:
            startup = time.perf_counter()
            tracker = _Tracker(out, manifest, on_progress)
            if on_pids is not None:
                on_pids(pids)
        # Every rank gets every shard, in the same order (actor tasks run in submission order).
        pending = {i: [r.run_shard.remote(i, shards[i], [texts[p] for p in shards[i]]) for r in ranks] for i in left}
        try:
            for i in left:
                tracker.done(i, ray.get(pending[i]))
        except ray.exceptions.RayError as exc:
            if attempt == cfg.group_restarts:
                raise RayJobError(
                    f"expert-parallel group failed {attempt + 1} times ({_fail_line(exc)}); "
                    "rerun the same command to resume"
                ) from exc
        finally:
            for r in ranks:
                ray.kill(r)
            _drain([ref for refs in pending.values() for ref in refs])
        remove_unlisted(out, manifest.listed_files())
    if tracker is None:
        return 0, 0.0, time.perf_counter(), all_pids
    return tracker.tokens, time.perf_counter() - tracker.t0, startup, all_pids


def raise_one_line(exc: BaseException) -> str:
    """The one-line message the entry points print for a known error."""
    if isinstance(exc, (RayJobError, ShardError)):
        return str(exc)
    return _fail_line(exc)
