"""`codeworld sandbox serve`: a sandbox pool over HTTP (FastAPI).

Every request passes one guard before any route, documentation pages and unknown paths included:
the bearer token (401 without it), then a cap on the request body counted while it streams in,
whatever Content-Length says (413 over it). Calls may not ask for more output than the service's
cap (400), sessions are capped in all and per client (429), and an error the caller did not cause
comes back as a generic message, its details only in the service's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from workers.sandbox.config import SandboxLimits
from workers.sandbox.models import ExecRequest, ExecResult, PoolStats
from workers.sandbox.pool import DEFAULT_IMAGE, SandboxError, SandboxPool, SandboxUnavailable, Session
from workers.sandbox.sessions import FilesPayload, PathsRequest, SessionLimit, SessionOpened, SessionRegistry

log = logging.getLogger(__name__)


class ServerConfig(BaseModel):
    """What the service runs, and the limits it holds every caller to."""

    backend: str = "docker"
    """docker, local or auto."""
    image: str = DEFAULT_IMAGE
    """Sandbox image (docker backend)."""
    size: int = Field(default=4, ge=1)
    """Warm sandboxes in the pool."""
    token: str = Field(min_length=16)
    """Bearer token every request must carry, to every route (the API documentation included)."""
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    """Per-sandbox limits."""
    session_idle_s: float = 600.0
    """Sessions idle this long are closed."""
    max_body_bytes: int = Field(default=64 << 20, ge=1024)
    """Largest request body accepted (files travel in it, base64-encoded); a bigger one is
    refused with 413 as soon as it is seen, counted as it streams in."""
    max_output_bytes: int = Field(default=16 << 20, ge=1024)
    """Most output one call may ask back: a run's `max_output_bytes` (stdout and stderr each)
    above this is refused with 400, and so is a get_files whose files hold more in all."""
    max_sessions: int = Field(default=64, ge=1)
    """Open sessions in all; one more is refused with 429."""
    max_sessions_per_client: int = Field(default=8, ge=1)
    """Open sessions per client address; one more is refused with 429."""


async def _reply(send: Any, code: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """Pure ASGI middleware in front of every route: token, then the body cap. The body is read
    here, up to the cap, and replayed to the app, so no route ever sees an oversized one."""

    def __init__(self, app: Any, token: str, max_body_bytes: int) -> None:
        self.app, self.token, self.max_body = app, token.encode(), max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.token):
            await _reply(send, 401, "a valid bearer token is required.", {"WWW-Authenticate": "Bearer"})
            return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body:
            await _reply(send, 413, f"the request body is over the service's cap of {self.max_body} bytes.")
            return
        body = await self._read_capped(receive)
        if body is None:
            await _reply(send, 413, f"the request body is over the service's cap of {self.max_body} bytes.")
            return
        await self.app(scope, self._replay(body, receive), send)

    async def _read_capped(self, receive: Any) -> bytes | None:
        """The whole body, or None as soon as it passes the cap (chunked bodies declare no size)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            size += len(message.get("body", b""))
            if size > self.max_body:
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Any) -> Any:
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()  # after the body: the server's disconnect notice
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


def create_app(config: ServerConfig) -> FastAPI:
    """The service: the pool starts with the app and closes with it."""
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool = SandboxPool(
            backend=config.backend,
            image=config.image,  # type: ignore[arg-type]
            size=config.size,
            limits=config.limits,
        )
        await pool.start()
        state["pool"] = pool
        state["sessions"] = SessionRegistry(
            pool, config.session_idle_s, config.max_sessions, config.max_sessions_per_client
        )
        expiry = asyncio.create_task(state["sessions"].expire_forever())
        try:
            yield
        finally:
            expiry.cancel()
            await state["sessions"].close_all()
            await pool.close()

    app = FastAPI(title="codeworld sandbox", lifespan=lifespan)
    app.add_middleware(_Guard, token=config.token, max_body_bytes=config.max_body_bytes)
    _add_error_handlers(app)

    def capped(request: ExecRequest) -> ExecRequest:
        if request.max_output_bytes > config.max_output_bytes:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"max_output_bytes {request.max_output_bytes} is over the service's cap of {config.max_output_bytes}.",
            )
        return request

    @app.post("/v1/run", response_model=ExecResult)
    async def run(request: ExecRequest) -> ExecResult:
        return await state["pool"].run(capped(request))

    @app.get("/v1/stats", response_model=PoolStats)
    async def stats() -> PoolStats:
        return state["pool"].stats()

    _add_session_routes(app, state, config, capped)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Bad input is named to the caller; anything else is a generic message, logged here."""

    @app.exception_handler(RequestValidationError)
    async def bad_input(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse(
            {"detail": f"{where}: {first.get('msg', '')}"[:500]}, status_code=status.HTTP_400_BAD_REQUEST
        )

    @app.exception_handler(SessionLimit)
    async def too_many(_: Request, exc: SessionLimit) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_429_TOO_MANY_REQUESTS)

    @app.exception_handler(SandboxError)
    @app.exception_handler(SandboxUnavailable)
    async def no_sandbox(request: Request, exc: RuntimeError) -> JSONResponse:
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse(
            {"detail": "no sandbox could serve the call; try again later."},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error."}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)


def _add_session_routes(app: FastAPI, state: dict, config: ServerConfig, capped: Any) -> None:
    """Sessions by id: open, exec / put / get, close (idle ones expire)."""

    def session(session_id: str) -> Session:
        try:
            return state["sessions"].get(session_id)
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc.args[0])) from exc

    @app.post("/v1/sessions", response_model=SessionOpened)
    async def open_session(request: Request) -> SessionOpened:
        client = request.client.host if request.client else "unknown"
        return SessionOpened(id=await state["sessions"].open(owner=client))

    @app.post("/v1/sessions/{session_id}/exec", response_model=ExecResult)
    async def session_exec(session_id: str, request: ExecRequest) -> ExecResult:
        return await session(session_id).exec(capped(request))

    @app.post("/v1/sessions/{session_id}/put")
    async def session_put(session_id: str, payload: FilesPayload) -> dict:
        try:
            await session(session_id).put_files(payload.files)
        except ValueError as exc:  # the caller's paths clash with its own files (a file where a folder is)
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)[:300]) from exc
        return {"ok": True}

    @app.post("/v1/sessions/{session_id}/get", response_model=FilesPayload)
    async def session_get(session_id: str, request: PathsRequest) -> FilesPayload:
        files = await session(session_id).get_files(request.paths)
        total = sum(len(data) for data in files.values())
        if total > config.max_output_bytes:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"the files asked for hold {total} bytes, over the service's cap of "
                f"{config.max_output_bytes}; ask for fewer.",
            )
        return FilesPayload(files=files)

    @app.delete("/v1/sessions/{session_id}")
    async def close_session(session_id: str) -> dict:
        await state["sessions"].close(session_id)
        return {"ok": True}
