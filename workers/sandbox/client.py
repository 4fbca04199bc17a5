"""SandboxClient: the SandboxPool API against a `codeworld sandbox serve` service."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import httpx

from workers.sandbox.models import ExecRequest, ExecResult, PoolStats, Status
from workers.sandbox.pool import SandboxError, SandboxUnavailable
from workers.sandbox.sessions import FilesPayload, PathsRequest, SessionOpened

_SLACK_S = 30.0


def _detail(response: httpx.Response) -> str:
    """The service's one-sentence reason, whatever the body holds."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return detail if isinstance(detail, str) else f"the sandbox service answered {response.status_code}."


class SandboxClient:
    """`async with SandboxClient(url, token) as pool: await pool.run(req)`; sessions as in SandboxPool."""

    def __init__(self, url: str, token: str, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.backend_name = f"service at {url}"
        """How messages name this pool (SandboxPool's backend name)."""
        self._http = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(60.0), transport=transport
        )

    async def __aenter__(self) -> "SandboxClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections (the service and its sandboxes stay)."""
        await self._http.aclose()

    async def _post(self, path: str, body: str, timeout_s: float = 60.0) -> bytes:
        response = await self._http.post(
            path, content=body, headers={"Content-Type": "application/json"}, timeout=timeout_s
        )
        if response.status_code == 401:
            raise PermissionError("the sandbox service refused the bearer token.")
        if response.status_code in (400, 413):
            raise ValueError(_detail(response))
        if response.status_code == 429:
            raise SandboxUnavailable(_detail(response))
        if response.status_code in (500, 503):
            raise SandboxError(_detail(response))
        response.raise_for_status()
        return response.content

    async def run(self, request: ExecRequest) -> ExecResult:
        """Like SandboxPool.run; a service that cannot be reached is a SANDBOX_ERROR, not an exception."""
        try:
            body = await self._post("/v1/run", request.model_dump_json(), request.timeout_s + _SLACK_S)
        except httpx.HTTPError as exc:
            return ExecResult(status=Status.SANDBOX_ERROR, error=f"the sandbox service failed: {exc!r}")
        return ExecResult.model_validate_json(body)

    async def stats(self) -> PoolStats:
        response = await self._http.get("/v1/stats")
        if response.status_code == 401:
            raise PermissionError("the sandbox service refused the bearer token.")
        response.raise_for_status()
        return PoolStats.model_validate_json(response.content)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator["RemoteSession"]:
        opened = SessionOpened.model_validate_json(await self._post("/v1/sessions", "{}"))
        try:
            yield RemoteSession(self, opened.id)
        finally:
            await self._http.delete(f"/v1/sessions/{opened.id}")


class RemoteSession:
    """A session held by the service: exec, put_files, get_files as on a local Session."""

    def __init__(self, client: SandboxClient, session_id: str) -> None:
        self._client, self._prefix = client, f"/v1/sessions/{session_id}"

    async def exec(self, request: ExecRequest) -> ExecResult:
        body = await self._client._post(f"{self._prefix}/exec", request.model_dump_json(), request.timeout_s + _SLACK_S)
        return ExecResult.model_validate_json(body)

    async def put_files(self, files: dict[str, bytes]) -> None:
        await self._client._post(f"{self._prefix}/put", FilesPayload(files=files).model_dump_json())

    async def get_files(self, paths: list[str]) -> dict[str, bytes]:
        body = await self._client._post(f"{self._prefix}/get", PathsRequest(paths=paths).model_dump_json())
        return FilesPayload.model_validate_json(body).files
