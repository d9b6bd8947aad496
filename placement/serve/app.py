"""The HTTP API of ``moeplace serve`` (FastAPI): routes only; the work is ``ReplanService``'s.

Every POST needs ``Authorization: Bearer TOKEN`` (401 without, 403 with a wrong token; compared in constant time).
Request bodies are limited to ``max_body`` bytes (413). A bad request gets 400 with ``{"error": one line}`` and
changes nothing. docs/service.md lists the routes.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from placement.deploy.export import ExportError, deepseek_triple, sglang_map, vllm_ascend_map, vllm_initial_map
from placement.plan import Plan, PlanError, json_default
from placement.serve.prom import service_registry
from placement.serve.service import ReplanService
from placement.serve.state import StateError
from placement.serve.window import ObservationError
from placement.trace.schema import TraceError

PLAN_FORMATS = ("plan", "sglang", "vllm", "deepseek")
DEFAULT_MAX_BODY = 64 << 20
FormatQ = Annotated[str, Query(description="plan, sglang, vllm or deepseek")]
LayersQ = Annotated[int | None, Query(ge=1, description="sglang: model layer count incl. dense layers")]


class ApiError(Exception):
    """An HTTP error with a one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def plan_payload(plan: Plan, fmt: str, num_model_layers: int | None = None) -> dict[str, Any]:
    """The plan as JSON in one of PLAN_FORMATS: the plan file, or the exporters' maps (placement/deploy/export.py)."""
    if fmt == "plan":
        return plan.to_dict()
    if fmt == "sglang":
        return {"physical_to_logical_map": sglang_map(plan, num_model_layers).tolist()}
    if fmt == "vllm":
        return {"initial_expert_map": vllm_initial_map(plan), "expert_map": vllm_ascend_map(plan)}
    if fmt == "deepseek":
        phy2log, log2phy, logcnt = deepseek_triple(plan)
        return {"phy2log": phy2log.tolist(), "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist()}
    raise ApiError(400, f"format={fmt!r}: use one of {', '.join(PLAN_FORMATS)}")


def _json(obj: Any, headers: dict[str, str] | None = None) -> Response:
    import json

    body = json.dumps(obj, separators=(",", ":"), default=json_default)
    return Response(body, media_type="application/json", headers=headers)


def create_app(service: ReplanService, token: str, *, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The API over a started ``service``; POSTs need ``token``. The server's shutdown (SIGTERM, Ctrl-C) stops
    the service: its watcher finishes the shard in progress and the checkpoint is written."""
    if not token:
        raise ValueError("an empty token would let anyone change plans; pass --token or --token-file")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(service.stop)

    app = FastAPI(
        title="moeplace serve", version="1", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    registry = service_registry(service)
    expected = token.encode()

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(
                401, "missing bearer token: send Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise ApiError(403, "wrong bearer token")

    Auth = Depends(require_token)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body):
            return JSONResponse({"error": f"body over the limit of {max_body} bytes"}, status_code=413)
        response: Response = await call_next(request)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ()))
        return JSONResponse({"error": f"{where}: {err.get('msg', 'invalid request')}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/v1/status")
    def status() -> Response:
        return _json(service.status())

    def plan_response(version: int | None, fmt: str, num_model_layers: int | None) -> Response:
        try:
            v = service.version(version)
            payload = plan_payload(v.plan, fmt, num_model_layers)
        except StateError as exc:
            raise ApiError(404, str(exc)) from None
        except (ExportError, PlanError) as exc:
            raise ApiError(400, str(exc)) from None
        return _json(payload, {"X-Plan-Version": str(v.version)})

    @app.get("/v1/plan")
    def plan(format: FormatQ = "plan", num_model_layers: LayersQ = None) -> Response:
        return plan_response(None, format, num_model_layers)

    @app.get("/v1/plan/{version}")
    def plan_version(version: int, format: FormatQ = "plan", num_model_layers: LayersQ = None) -> Response:
        return plan_response(version, format, num_model_layers)

    @app.get("/v1/moves/{version}")
    def moves(version: int) -> Response:
        try:
            v = service.version(version)
        except StateError as exc:
            raise ApiError(404, str(exc)) from None
        return _json({"version": v.version, "reason": v.reason, **v.moves}, {"X-Plan-Version": str(v.version)})

    @app.get("/v1/versions")
    def versions() -> Response:
        out = []
        for n in service.store.versions():
            v = service.version(n)
            out.append({"version": n, "reason": v.reason, "created": v.created, "moves": v.moves.get("num_moves", 0)})
        return _json({"versions": out})

    @app.post("/v1/observations", dependencies=[Auth])
    async def observations(
        request: Request, idempotency_key: Annotated[str | None, Header(max_length=200)] = None
    ) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise ApiError(413, f"body over the limit of {max_body} bytes")
        content_type = request.headers.get("content-type", "")
        try:
            res = await run_in_threadpool(service.observe, bytes(body), content_type, idempotency_key)
        except (ObservationError, TraceError) as exc:
            raise ApiError(400, str(exc)) from None
        return _json(res)

    @app.post("/v1/replan", dependencies=[Auth])
    def replan() -> Response:
        return _json(service.decide_now("request"))

    @app.post("/v1/rollback/{version}", dependencies=[Auth])
    def rollback(version: int) -> Response:
        try:
            return _json(service.rollback(version))
        except StateError as exc:
            raise ApiError(404, str(exc)) from None
        except PlanError as exc:
            raise ApiError(400, str(exc)) from None

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
