"""`codeworld sandbox serve`: a sandbox pool over HTTP (FastAPI), every route behind a bearer token."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import AsyncIterator

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from workers.sandbox.config import SandboxLimits
from workers.sandbox.models import ExecRequest, ExecResult, PoolStats
from workers.sandbox.pool import DEFAULT_IMAGE, SandboxError, SandboxPool, SandboxUnavailable, Session
from workers.sandbox.sessions import FilesPayload, PathsRequest, SessionOpened, SessionRegistry


class ServerConfig(BaseModel):
    """What the service runs."""

    backend: str = "docker"
    """docker, local or auto."""
    image: str = DEFAULT_IMAGE
    """Sandbox image (docker backend)."""
    size: int = Field(default=4, ge=1)
    """Warm sandboxes in the pool."""
    token: str = Field(min_length=16)
    """Bearer token every request must carry."""
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    """Per-sandbox limits."""
    session_idle_s: float = 600.0
    """Sessions idle this long are closed."""


def create_app(config: ServerConfig) -> FastAPI:
    """The service: the pool starts with the app and closes with it."""
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool = SandboxPool(backend=config.backend, image=config.image, size=config.size, limits=config.limits)  # type: ignore[arg-type]
        await pool.start()
        state["pool"], state["sessions"] = pool, SessionRegistry(pool, config.session_idle_s)
        expiry = asyncio.create_task(state["sessions"].expire_forever())
        try:
            yield
        finally:
            expiry.cancel()
            await state["sessions"].close_all()
            await pool.close()

    bearer = HTTPBearer(auto_error=False)

    def authorized(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), config.token.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required.",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="codeworld sandbox", lifespan=lifespan, dependencies=[Depends(authorized)])

    @app.exception_handler(ValueError)
    async def bad_input(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_400_BAD_REQUEST)

    @app.exception_handler(SandboxError)
    @app.exception_handler(SandboxUnavailable)
    async def no_sandbox(_: Request, exc: RuntimeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.post("/v1/run", response_model=ExecResult)
    async def run(request: ExecRequest) -> ExecResult:
        return await state["pool"].run(request)

    @app.get("/v1/stats", response_model=PoolStats)
    async def stats() -> PoolStats:
        return state["pool"].stats()

    _add_session_routes(app, state)
    return app


def _add_session_routes(app: FastAPI, state: dict) -> None:
    """Sessions by id: open, exec / put / get, close (idle ones expire)."""

    def session(session_id: str) -> Session:
        try:
            return state["sessions"].get(session_id)
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc.args[0])) from exc

    @app.post("/v1/sessions", response_model=SessionOpened)
    async def open_session() -> SessionOpened:
        return SessionOpened(id=await state["sessions"].open())

    @app.post("/v1/sessions/{session_id}/exec", response_model=ExecResult)
    async def session_exec(session_id: str, request: ExecRequest) -> ExecResult:
        return await session(session_id).exec(request)

    @app.post("/v1/sessions/{session_id}/put")
    async def session_put(session_id: str, payload: FilesPayload) -> dict:
        await session(session_id).put_files(payload.files)
        return {"ok": True}

    @app.post("/v1/sessions/{session_id}/get", response_model=FilesPayload)
    async def session_get(session_id: str, request: PathsRequest) -> FilesPayload:
        return FilesPayload(files=await session(session_id).get_files(request.paths))

    @app.delete("/v1/sessions/{session_id}")
    async def close_session(session_id: str) -> dict:
        await state["sessions"].close(session_id)
        return {"ok": True}
