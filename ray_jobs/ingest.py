"""New shards of a watched dataset counted as Ray tasks, for ``moeplace serve --ray`` (placement/serve/service.py).

``ShardCounter`` holds one Ray connection for the life of the service (``open`` / ``close``): an embedded local
Ray with ``num_cpus`` CPUs, or the cluster at ``address`` (or ``RAY_ADDRESS``); a process that is already
connected keeps its connection. ``counted(count, paths, *args)`` runs ``count(path, *args)`` in one Ray task per
shard (one CPU and one numba thread each, at most ``num_workers`` at once) and yields ``(path, result)`` in the
order of ``paths``, so a caller that folds results into decayed counts gets the same arrays as counting the
shards one after another in process. The counting function is the caller's (the service passes its own
``shard_counts``, so a shard is checked and counted exactly as in process); it returns the shard's count arrays.

A task that raises one of ``errors`` (a damaged shard, a shard of another model) yields that exception as the
shard's result, with its own one-line message, and the other shards go on. Any other failure (a worker lost
after ``max_retries``, a lost connection) raises ``RayJobError``; the shards not yet yielded stay pending.
On a cluster, the watched directory must be readable from every node (a shared file system).
"""

from __future__ import annotations

import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ray_jobs.driver import JobConfig, RayJobError, _probe, connect, raise_one_line

__all__ = ["ShardCounter"]


def _count_task(count: Callable[..., Any], path: Path, args: tuple[Any, ...]) -> Any:
    """Body of a Ray task: one numba thread (the task holds one CPU), then the caller's ``count(path, *args)``."""
    import numba

    numba.set_num_threads(1)
    return count(path, *args)


class ShardCounter:
    """Counts shards as Ray tasks over one connection; ``open`` before ``counted``, ``close`` when done."""

    def __init__(
        self, address: str | None = None, num_cpus: int = 2, num_workers: int = 2, max_retries: int = 3
    ) -> None:
        if num_cpus < 1 or num_workers < 1 or max_retries < 0:
            raise RayJobError(
                f"--ray-cpus {num_cpus}, --ray-workers {num_workers}: both must be >= 1 (retries {max_retries} >= 0)"
            )
        self.address = address
        self.num_cpus = num_cpus
        self.num_workers = num_workers
        self.max_retries = max_retries
        self.description = ""
        self._owns = False
        self._task: Any = None

    def open(self) -> str:
        """Connect (or start the embedded Ray) unless already connected; returns where the tasks run."""
        import ray

        if self._task is not None:
            return self.description
        if self.address is not None:
            _probe(self.address)  # fail fast, even when a connection is reused
        if ray.is_initialized():
            self.description = "the process's Ray connection"
        else:
            main = threading.current_thread() is threading.main_thread()
            on_term = signal.getsignal(signal.SIGTERM) if main else None
            self.description = connect(JobConfig(out=Path("."), address=self.address, num_cpus=self.num_cpus))
            self._owns = True
            if on_term is not None:  # ray.init makes SIGTERM exit(15); the caller's handling (a server's) is kept
                signal.signal(signal.SIGTERM, on_term)
        self._task = ray.remote(num_cpus=1, max_retries=self.max_retries)(_count_task)
        return self.description

    def close(self) -> None:
        """Shut down the Ray this counter started (a connection it found is kept); idempotent."""
        import ray

        if self._owns:
            ray.shutdown()
        self._owns = False
        self._task = None

    def counted(
        self,
        count: Callable[..., Any],
        paths: Sequence[Path],
        *args: Any,
        errors: tuple[type[BaseException], ...] = (),
    ) -> Iterator[tuple[Path, Any]]:
        """``(path, count(path, *args))`` per shard in the order of ``paths``, counted as Ray tasks; a shard whose
        task raised one of ``errors`` yields that exception instead. Tasks not yet yielded when the caller stops
        iterating are cancelled."""
        import ray

        if self._task is None:
            raise RayJobError("the shard counter is not connected; call open() first")
        todo = deque(paths)
        pending: deque[tuple[Path, Any]] = deque()
        shared = ray.put(args) if todo else None
        try:
            while todo or pending:
                while todo and len(pending) < self.num_workers:
                    path = todo.popleft()
                    pending.append((path, self._task.remote(count, path, shared)))
                path, ref = pending.popleft()
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    if not isinstance(exc.cause, errors):
                        raise RayJobError(f"{path.name}: a counting task failed: {raise_one_line(exc)}") from exc
                    got = exc.cause
                except ray.exceptions.RayError as exc:
                    raise RayJobError(f"{path.name}: a counting task was lost: {raise_one_line(exc)}") from exc
                yield path, got
        finally:
            for _, ref in pending:
                ray.cancel(ref)
