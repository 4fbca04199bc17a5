"""The dashboard: a read-only FastAPI app over a runs directory, and the web page that reads it.

    GET /                        the page (rl/api/static; the chart library is vendored, no CDN)
    GET /api/runs                runs found in the runs directory
    GET /api/metrics?run=        a run's metric names
    GET /api/series?run=&name=   curves, downsampled on the server (LTTB), as JSON or CSV
    GET /api/samples?run=...     a page of recorded samples, filtered
    GET /api/samples/facets      what a run's sample store holds
    GET /api/sample?run=&id=     one sample, turn by turn
    GET /api/task?run=&task_id=  one task's samples across steps, side by side
    GET /api/events?run=         server-sent events: new metric rows and samples as the run trains

Only GET and HEAD exist. With a token every request must carry it (an `Authorization: Bearer`
header, a `token` query parameter, or the cookie the page sets from it); without one (loopback
only) requests must name a loopback host, so a web page elsewhere cannot reach the dashboard
through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from rl.api.runs import Cursor, RunInfo, RunsRoot, UnknownRun
from rl.samples import SampleFacets, SamplePage, SampleQuery, SampleReader, SampleRecord

STATIC = Path(__file__).parent / "static"
COOKIE = "codeworld_token"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
MAX_POINTS = 10_000
"""Most points per curve a client may ask for (0 asks for all of them)."""
EVENT_PERIOD_S = 1.0
"""How often the live stream looks for new rows."""

RunId = Annotated[str, Query(max_length=512, description="A run id from /api/runs.")]
Points = Annotated[int, Query(ge=0, le=MAX_POINTS, description="Points per curve (downsampled); 0: all.")]


class Series(BaseModel):
    """One curve of one run."""

    run: str
    """The run id."""
    name: str
    """The metric name."""
    steps: list[float]
    """Steps of the points kept."""
    values: list[float]
    """Values at those steps."""
    total: int
    """Points the curve has before downsampling."""


class SeriesSet(BaseModel):
    """Curves asked for together (one chart); curves a run does not have are left out."""

    series: list[Series]
    """The curves."""


class SampleListQuery(SampleQuery):
    """A run and the filters of its sample list."""

    run: str = Field(max_length=512)
    """A run id from /api/runs."""


class TaskSamples(BaseModel):
    """The recorded samples of one task, oldest step first."""

    items: list[SampleRecord]
    """The samples, whole."""


class RunList(BaseModel):
    """The runs of the runs directory."""

    runs: list[RunInfo]
    """Every run found, most recently updated first."""


class MetricNames(BaseModel):
    """What a run has logged."""

    run: str
    """The run id."""
    names: list[str]
    """Its metric names, sorted."""


def create_app(runs_dir: Path, token: str | None = None) -> FastAPI:
    """The dashboard app over `runs_dir`; with `token`, every request must carry it."""
    root = RunsRoot(runs_dir)
    app = FastAPI(
        title="codeworld dashboard",
        version="1",
        docs_url=None,
        redoc_url=None,
        description="Read-only view of the runs in one runs directory.",
    )
    _add_run_routes(app, root)
    _add_sample_routes(app, root)
    _add_page_routes(app, root, token)
    app.mount("/static", StaticFiles(directory=STATIC, follow_symlink=False), name="static")

    @app.exception_handler(UnknownRun)
    async def unknown_run(request: Request, exc: UnknownRun) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(sqlite3.DatabaseError)
    async def unreadable_store(request: Request, exc: sqlite3.DatabaseError) -> JSONResponse:
        return JSONResponse({"detail": f"The run's sample store cannot be read: {exc}."}, status_code=503)

    app.add_middleware(Guard, token=token)
    return app


def _add_run_routes(app: FastAPI, root: RunsRoot) -> None:
    @app.get("/api/runs", response_model=RunList)
    def runs() -> RunList:
        infos = []
        for run_id in root.runs():
            try:
                infos.append(root.info(run_id))
            except UnknownRun:
                continue  # removed since the walk
        return RunList(runs=sorted(infos, key=lambda r: -r.updated))

    @app.get("/api/metrics", response_model=MetricNames)
    def metrics(run: RunId) -> MetricNames:
        return MetricNames(run=run, names=sorted(root.metrics(run).columns))

    csv_too = {200: {"content": {"text/csv": {}}, "description": "JSON, or CSV (run,name,step,value)"}}

    @app.get("/api/series", response_model=SeriesSet, responses=csv_too)
    def series(
        run: Annotated[list[str], Query(min_length=1, max_length=16, description="Run ids.")],
        name: Annotated[list[str], Query(min_length=1, max_length=256, description="Metric names.")],
        points: Points = 1000,
        format: Literal["json", "csv"] = "json",
    ) -> Any:
        out = []
        for run_id in dict.fromkeys(run):
            columns = root.metrics(run_id)
            for metric in dict.fromkeys(name):
                found = columns.series(metric, points)
                if found is not None:
                    out.append(
                        Series(
                            run=run_id,
                            name=metric,
                            steps=found[0],
                            values=found[1],
                            total=len(columns.columns[metric][0]),
                        )
                    )
        if format == "csv":
            return _csv(out)
        return SeriesSet(series=out)


def _csv(series: list[Series]) -> Response:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["run", "name", "step", "value"])
    for s in series:
        writer.writerows((s.run, s.name, int(step), value) for step, value in zip(s.steps, s.values))
    return Response(
        buf.getvalue(), media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="series.csv"'}
    )


def _reader(root: RunsRoot, run: str) -> SampleReader:
    reader = root.samples(run)
    if reader is None:
        raise HTTPException(404, f"Run {run!r} has no recorded samples.")
    return reader


def _add_sample_routes(app: FastAPI, root: RunsRoot) -> None:
    @app.get("/api/samples", response_model=SamplePage)
    def samples(query: Annotated[SampleListQuery, Query()]) -> SamplePage:
        return _reader(root, query.run).query(query)

    @app.get("/api/samples/facets", response_model=SampleFacets)
    def facets(run: RunId) -> SampleFacets:
        return _reader(root, run).facets()

    @app.get("/api/task", response_model=TaskSamples)
    def task(
        run: RunId,
        task_id: Annotated[str, Query(max_length=512, description="A task id.")],
        limit: Annotated[int, Query(ge=1, le=200, description="Most samples returned.")] = 64,
    ) -> TaskSamples:
        return TaskSamples(items=_reader(root, run).task(task_id, limit))

    @app.get("/api/sample", response_model=SampleRecord)
    def sample(run: RunId, id: Annotated[str, Query(max_length=128, description="A sample id.")]) -> SampleRecord:
        found = _reader(root, run).get(id)
        if found is None:
            raise HTTPException(404, f"Run {run!r} has no sample {id!r}.")
        return found


def _add_page_routes(app: FastAPI, root: RunsRoot, token: str | None) -> None:
    @app.get("/", include_in_schema=False)
    def index(request: Request) -> FileResponse:
        page = FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})
        if token is not None and request.query_params.get("token") == token:
            # The page's own requests (and the event stream, which cannot send headers) carry it.
            page.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return page

    @app.get("/api/events", include_in_schema=False)
    async def events(request: Request, run: Annotated[list[str], Query(min_length=1, max_length=16)]) -> Any:
        runs = list(dict.fromkeys(run))
        offsets: dict[str, Cursor | None] = dict.fromkeys(runs)
        seqs: dict[str, int | None] = dict.fromkeys(runs)
        for run_id in runs:
            root.run_dir(run_id)  # unknown runs are a 404 before the stream starts
            # The starting point is taken before the response starts: whatever a client fetches
            # after the stream has opened cannot miss a row.
            await asyncio.to_thread(_news, root, run_id, offsets, seqs)
        return StreamingResponse(
            _stream(request, root, runs, offsets, seqs),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )


async def _stream(
    request: Request, root: RunsRoot, runs: list[str], offsets: dict[str, Cursor | None], seqs: dict[str, int | None]
) -> AsyncIterator[str]:
    """`metrics` events carry rows appended since the stream opened (a client opens the stream
    before fetching the curves, and drops steps it already has), or, `rewound`, the whole file
    when a new or resumed run rewrote it (the client fetches its curves again); `samples` events
    say the store grew. A comment every 15 s keeps proxies from closing an idle stream."""
    quiet = 0.0
    yield "retry: 2000\n\n"
    while not await request.is_disconnected():
        sent = False
        for run_id in runs:
            for event in await asyncio.to_thread(_news, root, run_id, offsets, seqs):
                yield event
                sent = True
        quiet = 0.0 if sent else quiet + EVENT_PERIOD_S
        if quiet >= 15:
            quiet = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(EVENT_PERIOD_S)


def _news(root: RunsRoot, run_id: str, offsets: dict[str, Cursor | None], seqs: dict[str, int | None]) -> list[str]:
    events = []
    try:
        offsets[run_id], rows, rewound = root.tail(run_id, offsets[run_id])
        reader = root.samples(run_id)
        seq = reader.last_seq() if reader is not None else 0
    except (OSError, UnknownRun, sqlite3.Error):
        return []  # the run went away or is being rewritten; the next period tries again
    if rows or rewound:
        news = {"run": run_id, "rows": rows, "rewound": rewound}
        events.append(f"event: metrics\ndata: {json.dumps(news)}\n\n")
    if seqs[run_id] is not None and seq != seqs[run_id]:
        events.append(f"event: samples\ndata: {json.dumps({'run': run_id, 'last_seq': seq})}\n\n")
    seqs[run_id] = seq
    return events


Asgi = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class Guard:
    """ASGI middleware in front of the app: read-only methods, the token, loopback host names and
    headers that keep the page from being framed or fed foreign scripts."""

    def __init__(self, app: Asgi, token: str | None) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, detail = refusal
            refused = JSONResponse({"detail": detail}, status_code=status, headers=_SECURITY)
            await refused(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (k.lower().encode(), v.encode()) for k, v in _SECURITY.items()
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        if scope["method"] not in ("GET", "HEAD"):
            return 405, "The dashboard is read-only: only GET and HEAD requests are served."
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token is None:
            if _hostname(headers.get("host", "")) not in LOOPBACK_HOSTS:
                return 403, ("This dashboard serves only requests to localhost; start it with a token to serve others.")
            return None
        offered = [headers.get("authorization", "").removeprefix("Bearer ").strip()]
        offered += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            pass  # a malformed cookie header carries no token
        if COOKIE in cookie:
            offered.append(cookie[COOKIE].value)
        if any(o and secrets.compare_digest(o.encode(), self.token.encode()) for o in offered):
            return None
        return 401, (
            "A token is required: open the URL that `codeworld dashboard` printed, or send "
            "'Authorization: Bearer <token>'."
        )


def _hostname(host_header: str) -> str:
    """The host of a Host header without its port ("[::1]:80" -> "[::1]")."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


_SECURITY = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
