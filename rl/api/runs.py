"""Read-only access to a runs directory for the dashboard: which runs exist, their metrics as
columns (read incrementally, downsampled on request) and their sample stores.

Nothing a request names is ever turned into a path. A run is found by walking the runs directory
(two levels, never through a symbolic link) for a regular `metrics.jsonl`; a request names a run by
the id of that walk and anything else is unknown. The files read inside a run are fixed names,
opened only when they are regular files (a symbolic link planted in a run is refused).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import stat
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel

from rl.metrics import FILE_NAME as METRICS_FILE
from rl.samples import FILE_NAME as SAMPLES_FILE
from rl.samples import SampleReader

SUMMARY_FILE = "summary.json"
LIVE_WINDOW_S = 60.0
"""A run whose metrics changed this recently and that has no summary yet is shown as live."""
_DEPTH = 2
"""How deep below the runs directory runs are looked for (`runs/demo`, `runs/sweep/lr3e-4`)."""


class RunInfo(BaseModel):
    """One run in the runs directory."""

    id: str
    """The run's path relative to the runs directory ("." for the directory itself)."""
    steps: int
    """The last step in its metrics."""
    updated: float
    """When its metrics last changed (Unix time)."""
    live: bool
    """Whether it looks like it is still training (metrics changed recently, no summary yet)."""
    has_samples: bool
    """Whether it has a sample store."""
    summary: dict[str, Any] | None
    """Its summary.json once it has finished."""


class UnknownRun(LookupError):
    """A run id that is not a run of the runs directory."""


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refusing a symbolic link at the last component (the
    directories above it were found without following links)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path.name} is not a regular file")
    return fd


def lttb(xs: array, ys: array, points: int) -> tuple[list[float], list[float]]:
    """Largest-triangle-three-buckets downsampling: `points` points that keep a curve's shape
    (peaks and dips survive, unlike averaging); the first and last points are always kept."""
    n = len(xs)
    if points <= 0 or n <= points or points < 3:
        return list(xs), list(ys)
    out_x, out_y = [xs[0]], [ys[0]]
    width = (n - 2) / (points - 2)
    a = 0
    for i in range(points - 2):
        lo, hi = int(i * width) + 1, int((i + 1) * width) + 1
        nxt_lo, nxt_hi = hi, min(int((i + 2) * width) + 1, n)
        cx = sum(xs[nxt_lo:nxt_hi]) / max(nxt_hi - nxt_lo, 1) if nxt_hi > nxt_lo else xs[n - 1]
        cy = sum(ys[nxt_lo:nxt_hi]) / max(nxt_hi - nxt_lo, 1) if nxt_hi > nxt_lo else ys[n - 1]
        ax, ay = xs[a], ys[a]
        best, best_area = lo, -1.0
        for j in range(lo, hi):
            area = abs((ax - cx) * (ys[j] - ay) - (ax - xs[j]) * (cy - ay))
            if area > best_area:
                best, best_area = j, area
        out_x.append(xs[best])
        out_y.append(ys[best])
        a = best
    out_x.append(xs[n - 1])
    out_y.append(ys[n - 1])
    return out_x, out_y


def parse_rows(text: str) -> Iterator[tuple[int, dict[str, float]]]:
    """(step, numeric metrics) of each well-formed line; other lines are skipped."""
    for line in text.splitlines():
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
        row.pop("time", None)
        yield (
            step,
            {
                k: float(v)
                for k, v in row.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            },
        )


class Cursor(NamedTuple):
    """Where the live stream stands in a run's metrics file."""

    inode: int
    """The file read (a rewritten file is a new one)."""
    offset: int
    """Bytes of it already sent."""


class MetricColumns:
    """One metrics.jsonl as columns (name → steps, values), extended as the file grows. A step
    logged again (a run resumed in the same directory) replaces it and what followed it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: dict[str, tuple[array, array]] = {}
        self.last_step = 0
        self._offset, self._inode = 0, None
        self._lock = threading.Lock()

    def refresh(self) -> MetricColumns:
        with self._lock:
            fd = _open_regular(self.path)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._inode or st.st_size < self._offset:  # replaced or truncated
                    self.columns, self.last_step, self._offset, self._inode = {}, 0, 0, st.st_ino
                f.seek(self._offset)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next refresh
            self._offset += end
            for step, row in parse_rows(chunk[:end].decode("utf-8", "replace")):
                self._append(step, row)
        return self

    def _append(self, step: int, row: dict[str, float]) -> None:
        for name, value in row.items():
            steps, values = self.columns.setdefault(name, (array("d"), array("d")))
            if steps and step <= steps[-1]:
                cut = bisect.bisect_left(steps, step)
                del steps[cut:], values[cut:]
            steps.append(step)
            values.append(value)
        self.last_step = step

    def series(self, name: str, points: int) -> tuple[list[float], list[float]] | None:
        if name not in self.columns:
            return None
        steps, values = self.columns[name]
        return lttb(steps, values, points)


class RunsRoot:
    """The runs directory the dashboard serves."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._found: dict[str, Path] = {}
        self._found_at = 0.0
        self._columns: dict[str, MetricColumns] = {}
        self._lock = threading.Lock()

    def _walk(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        frontier = [(self.root, 0)]
        while frontier:
            directory, depth = frontier.pop()
            if _regular(directory / METRICS_FILE):
                found[directory.relative_to(self.root).as_posix()] = directory
            if depth == _DEPTH:
                continue
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            frontier += [
                (Path(e.path), depth + 1)
                for e in entries
                if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
            ]
        return found

    def runs(self) -> dict[str, Path]:
        """Run id → directory; the walk is repeated at most every two seconds."""
        with self._lock:
            if time.monotonic() - self._found_at > 2.0:
                self._found, self._found_at = self._walk(), time.monotonic()
            return dict(self._found)

    def run_dir(self, run_id: str) -> Path:
        found = self.runs().get(run_id)
        if found is None:
            raise UnknownRun(f"No run {run_id!r} in the runs directory.")
        return found

    def metrics(self, run_id: str) -> MetricColumns:
        """The run's metric columns, brought up to date."""
        directory = self.run_dir(run_id)
        with self._lock:
            columns = self._columns.get(run_id)
            if columns is None or columns.path != directory / METRICS_FILE:
                columns = self._columns[run_id] = MetricColumns(directory / METRICS_FILE)
        try:
            return columns.refresh()
        except OSError:
            raise UnknownRun(f"No run {run_id!r} in the runs directory.") from None

    def samples(self, run_id: str) -> SampleReader | None:
        path = self.run_dir(run_id) / SAMPLES_FILE
        return SampleReader(path) if _regular(path) else None

    def info(self, run_id: str) -> RunInfo:
        directory = self.run_dir(run_id)
        columns = self.metrics(run_id)
        updated = os.lstat(directory / METRICS_FILE).st_mtime
        summary = None
        if _regular(directory / SUMMARY_FILE):
            try:
                with os.fdopen(_open_regular(directory / SUMMARY_FILE)) as f:
                    summary = json.load(f)
            except (OSError, ValueError):
                summary = None  # being written, or not ours: the run is shown without it
        summary = summary if isinstance(summary, dict) else None
        return RunInfo(
            id=run_id,
            steps=columns.last_step,
            updated=updated,
            live=summary is None and time.time() - updated < LIVE_WINDOW_S,
            has_samples=_regular(directory / SAMPLES_FILE),
            summary=summary,
        )

    def tail(self, run_id: str, cursor: Cursor | None) -> tuple[Cursor, list[dict[str, Any]], bool]:
        """Complete rows appended since `cursor` (None: none, start from the end now), the new
        cursor, and whether the file was replaced or cut since (a new run or a resume into the
        directory rewrote it): the rows are then the whole file's, and the client redraws."""
        fd = _open_regular(self.run_dir(run_id) / METRICS_FILE)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if cursor is None:
                return Cursor(st.st_ino, st.st_size), [], False
            rewound = st.st_ino != cursor.inode or st.st_size < cursor.offset
            offset = 0 if rewound else cursor.offset
            f.seek(offset)
            chunk = f.read(st.st_size - offset)
        end = chunk.rfind(b"\n") + 1
        rows = [{"step": step, **row} for step, row in parse_rows(chunk[:end].decode("utf-8", "replace"))]
        return Cursor(st.st_ino, offset + end), rows, rewound
