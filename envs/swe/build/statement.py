"""Problem statements for built tasks, written like a bug report from the tests that now fail:
which tests, and what pytest printed for the first few of them (never the injected change)."""

from __future__ import annotations

import re

# pytest's failure section headers: `____ TestClass.test_name ____` (also `[param]` variants).
_SECTION = re.compile(r"^_{3,} (.+?) _{3,}$")
_RULE = re.compile(r"^={3,}")
MAX_SHOWN_TESTS = 8
MAX_EXCERPT_LINES = 25


def failure_sections(log: str) -> dict[str, list[str]]:
    """pytest's per-test failure output (`--tb=short`), keyed by the section's title
    (`test_name` or `Class.test_name`, parameters included)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in log.splitlines():
        header = _SECTION.match(line)
        if header:
            current = sections.setdefault(header.group(1), [])
        elif _RULE.match(line):
            current = None
        elif current is not None:
            current.append(line)
    return sections


def _section_title(test_id: str) -> str:
    """How pytest titles the failure section of a node id: `Class.test` for methods."""
    parts = test_id.split("::")[1:]
    return ".".join(parts)


def write_statement(package: str, version: str, failing: list[str], log: str) -> str:
    """A bug report for `package` from its failing tests and the mutant's test output."""
    sections = failure_sections(log)
    lines = [
        f"A regression was introduced in `{package}` {version}: the library's own test suite now "
        f"has {len(failing)} failing test{'s' if len(failing) != 1 else ''}, which passed before.",
        "",
        "Failing tests:",
        *[f"- {t}" for t in failing[:MAX_SHOWN_TESTS]],
    ]
    if len(failing) > MAX_SHOWN_TESTS:
        lines.append(f"- ... and {len(failing) - MAX_SHOWN_TESTS} more")
    for test in failing[:2]:
        excerpt = sections.get(_section_title(test), [])
        if excerpt:
            lines += ["", f"Output of `{test}`:", "```", *excerpt[-MAX_EXCERPT_LINES:], "```"]
    lines += [
        "",
        "Fix the library code so that these tests pass again without breaking the other "
        "tests. Do not change the tests.",
    ]
    return "\n".join(lines)
