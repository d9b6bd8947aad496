"""``moeplace serve --ray-serve``: the re-planning service as a Ray Serve application, a thin shell.

The application is the very API ``moeplace serve`` runs under uvicorn (placement/serve/app.py ``create_app``),
built inside the deployment's one replica (``serve.ingress`` with a builder): the service, its watcher thread and
its state directory live in that replica's process, and Ray Serve's HTTP proxy serves it at ``--host``/``--port``.
One replica only: a state directory has one writer (its lock), and every decision reads the one routing window.
The cluster is the one ``ray_jobs.driver.connect`` gives (an embedded local Ray by default, or ``--ray-address``);
``run`` blocks until SIGTERM or SIGINT, then deletes the application and shuts Serve down. The service checkpoints
every shard's counts with its ledger entry as it ingests it, so the state directory is whole whenever the replica
stops: a plain ``moeplace serve`` resumes it exactly (tests/test_serve_rayserve.py).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_jobs.driver import JobConfig, RayJobError, cluster_address, connect, raise_one_line

if TYPE_CHECKING:
    from fastapi import FastAPI

    from placement.serve.service import ServiceConfig

APP_NAME = "moeplace"
READY_LINE = "moeplace serve on Ray Serve: listening on"


def build_api(plan_path: str, config: ServiceConfig, token: str, max_body: int) -> FastAPI:
    """In the replica: start the service from the initial plan and return its API."""
    from placement.plan import Plan
    from placement.serve.app import create_app
    from placement.serve.service import ReplanService

    service = ReplanService(Plan.load(Path(plan_path)), config)
    service.start()
    return create_app(service, token, max_body=max_body)


def application(plan_path: Path, config: ServiceConfig, token: str, max_body: int, num_cpus: float = 1.0) -> Any:
    """The Ray Serve application (one replica of ``build_api``'s app), not yet running."""
    from ray import serve

    def builder() -> FastAPI:  # a plain function (Ray Serve calls it in the replica); a partial would be an app
        return build_api(str(plan_path), config, token, max_body)

    options = serve.deployment(name="replan", num_replicas=1, ray_actor_options={"num_cpus": num_cpus})
    return options(serve.ingress(builder)()).bind()


def run(
    plan_path: Path,
    config: ServiceConfig,
    token: str,
    *,
    max_body: int,
    host: str,
    port: int,
    address: str | None,
    num_cpus: int,
    on_ready: Any = print,
) -> None:
    """Serve the application on Ray Serve until SIGTERM or SIGINT (module docstring)."""
    import ray
    from ray import serve

    # the replica's working directory is Ray's, not this process's: it gets absolute paths
    plan_path = Path(plan_path).resolve()
    watch = None if config.watch_dir is None else Path(config.watch_dir).resolve()
    config = replace(config, state_dir=Path(config.state_dir).resolve(), watch_dir=watch)
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    job = JobConfig(out=Path("."), address=address, num_cpus=num_cpus)
    own_cluster = cluster_address(job) is None
    where = connect(job)
    for s in previous:  # ray.init makes SIGTERM exit at once; stop cleanly instead
        signal.signal(s, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application(plan_path, config, token, max_body), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # the replica could not start: its service's own error, one line
            raise RayJobError(f"the service did not start on Ray Serve: {raise_one_line(exc)}") from None
        on_ready(f"{READY_LINE} http://{host}:{port} ({where})")
        while not stop.wait(0.5):
            pass
    finally:
        with contextlib.suppress(Exception):  # nothing to delete when it never started
            serve.delete(APP_NAME)
        if own_cluster:  # Serve on a cluster someone else runs keeps its other applications
            serve.shutdown()
        ray.shutdown()  # the embedded Ray stops; a connection to a cluster is closed
        for s, handler in previous.items():
            signal.signal(s, handler)
