"""Where public benchmark files are found, and JSON/JSONL reading with clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """`$CODEWORLD_DATA`, else the `shared/data` folder beside the repository."""
    return Path(os.environ.get("CODEWORLD_DATA", _REPO.parent / "shared" / "data"))


def resolve(data: Path | None, default: str) -> Path:
    """`data` when given, else `default` under the data root; an error names the missing file."""
    path = Path(data) if data is not None else data_root() / default
    if not path.is_file():
        raise FileNotFoundError(f"Dataset file {str(path)!r} does not exist (set the env's `data` or CODEWORLD_DATA).")
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file or a JSON array; an error names the file and line at fault."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON array of records.")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from None
    return rows
