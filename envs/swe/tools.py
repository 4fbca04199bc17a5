"""The text format in which the SWE agent calls its tools, and its strict parser.

One model turn holds free text (its reasoning) followed by exactly one tool call:

    <tool: NAME>
    BODY
    </tool>

The opening line and the closing `</tool>` line stand alone on their lines; nothing but white
space may follow the closing line. The body's first line is the argument line (a shell command
for `bash`, a path for the file tools) and the rest is the tool's text payload. Line-oriented
markers were chosen over JSON because models copy source code verbatim far more reliably than
they escape it into JSON strings.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

ToolName = Literal["bash", "view", "edit", "create", "submit"]
TOOL_NAMES: tuple[str, ...] = ("bash", "view", "edit", "create", "submit")

_OPEN = re.compile(r"^<tool: *([a-z_]+)>[ \t]*$", re.M)
_CLOSE = "</tool>"
_SEARCH, _DIVIDER, _REPLACE = "<<<<<<< SEARCH", "=======", ">>>>>>> REPLACE"
_RANGE = re.compile(r"^(\d+)\s+(-1|\d+)$")

TOOL_DOC = f"""\
Call exactly one tool per reply. Write any reasoning first, then the call, and nothing after it.
The `<tool: NAME>` and `</tool>` lines stand alone at the start of their lines.

bash: run a shell command in the repository. The shell persists: `cd` and `export` carry over
between calls; each call has a time limit. The body is the command (one or more lines).
<tool: bash>
python -m pytest -x -q tests/test_core.py
</tool>

view: show a file with line numbers; an optional second line `START END` picks lines
(END = -1 for the end of the file).
<tool: view>
src/pkg/core.py
40 80
</tool>

edit: replace one exact occurrence of a text in a file. The SEARCH text must match the file
exactly (indentation included) and occur exactly once.
<tool: edit>
src/pkg/core.py
{_SEARCH}
    return a < b
{_DIVIDER}
    return a <= b
{_REPLACE}
</tool>

create: write a new file (or overwrite one) with the given content.
<tool: create>
src/pkg/helpers.py
def helper():
    return 1
</tool>

submit: end the episode; your changes to the repository are graded by hidden tests.
<tool: submit>
</tool>
"""


class ToolCall(BaseModel):
    """One parsed tool call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ToolName
    """Which tool to run."""
    arg: str = ""
    """The argument line: the command for `bash` (all body lines), the path for file tools."""
    text: str = ""
    """The payload: file content for `create`, the replacement text for `edit`."""
    search: str = ""
    """`edit` only: the exact text to replace."""
    start: int | None = None
    """`view` only: first line to show (1-based)."""
    end: int | None = None
    """`view` only: last line to show (-1 = end of file)."""


class ToolFormatError(ValueError):
    """The model's turn does not hold exactly one well-formed tool call; the message says why."""


def parse_tool_call(text: str) -> ToolCall:
    """Parse the single tool call at the end of a model turn, or raise `ToolFormatError`."""
    opens = list(_OPEN.finditer(text))
    if not opens:
        raise ToolFormatError("No tool call found: end your reply with `<tool: NAME>` ... `</tool>`.")
    start = opens[0]
    name = start.group(1)
    if name not in TOOL_NAMES:
        raise ToolFormatError(f"Unknown tool {name!r}; the tools are: {', '.join(TOOL_NAMES)}.")
    lines = text[start.end() :].split("\n")[1:]
    close = _last_close_line(lines)
    if close is None:
        raise ToolFormatError(f"The `<tool: {name}>` call has no closing `</tool>` line.")
    if any(line.strip() for line in lines[close + 1 :]):
        raise ToolFormatError("Text after `</tool>`: one tool call must end the reply.")
    body = lines[:close]
    return _BUILDERS[name](body)


def _last_close_line(lines: list[str]) -> int | None:
    """Index of the last line that is exactly the closing tag (trailing spaces allowed); the last
    one, so that file content may itself mention the tag."""
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].rstrip() == _CLOSE:
            return i
    return None


def _bash(body: list[str]) -> ToolCall:
    command = "\n".join(body).strip()
    if not command:
        raise ToolFormatError("`bash` needs a command in its body.")
    return ToolCall(name="bash", arg=command)


def _path(body: list[str], tool: str) -> str:
    path = body[0].strip() if body else ""
    if not path:
        raise ToolFormatError(f"`{tool}` needs a file path on its first line.")
    return path


def _view(body: list[str]) -> ToolCall:
    path = _path(body, "view")
    rest = [line.strip() for line in body[1:] if line.strip()]
    if not rest:
        return ToolCall(name="view", arg=path)
    match = _RANGE.match(rest[0]) if len(rest) == 1 else None
    if match is None:
        raise ToolFormatError("`view` takes a path and optionally one line `START END` (END = -1 for the end).")
    first, last = int(match.group(1)), int(match.group(2))
    if first < 1 or (last != -1 and last < first):
        raise ToolFormatError(f"`view` range {first} {last} is empty: START must be ≥ 1 and ≤ END.")
    return ToolCall(name="view", arg=path, start=first, end=last)


def _edit(body: list[str]) -> ToolCall:
    path = _path(body, "edit")
    rest = body[1:]
    markers = [i for i, line in enumerate(rest) if line.rstrip() in (_SEARCH, _DIVIDER, _REPLACE)]
    kinds = [rest[i].rstrip() for i in markers]
    if kinds != [_SEARCH, _DIVIDER, _REPLACE] or markers[0] != 0:
        raise ToolFormatError(
            f"`edit` needs, after the path line, exactly one `{_SEARCH}` / `{_DIVIDER}` / `{_REPLACE}` block."
        )
    if any(line.strip() for line in rest[markers[2] + 1 :]):
        raise ToolFormatError(f"`edit`: text after `{_REPLACE}`.")
    search = "\n".join(rest[markers[0] + 1 : markers[1]])
    replace = "\n".join(rest[markers[1] + 1 : markers[2]])
    if not search.strip():
        raise ToolFormatError("`edit`: the SEARCH text is empty; use `create` to write a whole file.")
    return ToolCall(name="edit", arg=path, search=search, text=replace)


def _create(body: list[str]) -> ToolCall:
    path = _path(body, "create")
    content = "\n".join(body[1:])
    return ToolCall(name="create", arg=path, text=content + "\n" if content else "")


def _submit(body: list[str]) -> ToolCall:
    if any(line.strip() for line in body):
        raise ToolFormatError("`submit` takes no arguments.")
    return ToolCall(name="submit")


_BUILDERS = {"bash": _bash, "view": _view, "edit": _edit, "create": _create, "submit": _submit}
