"""The agent's tool-call format: every tool parses, and every malformed call is refused."""

import pytest

from envs.swe.tools import TOOL_DOC, ToolFormatError, parse_tool_call


def test_bash_call_after_reasoning_keeps_multiline_command():
    call = parse_tool_call("Let me look.\n<tool: bash>\ncd src\nls -la | head\n</tool>\n")
    assert call.name == "bash"
    assert call.arg == "cd src\nls -la | head"


def test_view_with_and_without_range():
    assert parse_tool_call("<tool: view>\npkg/a.py\n</tool>").model_dump(include={"arg", "start", "end"}) == {
        "arg": "pkg/a.py",
        "start": None,
        "end": None,
    }
    call = parse_tool_call("<tool: view>\npkg/a.py\n10 -1\n</tool>")
    assert (call.start, call.end) == (10, -1)


def test_edit_keeps_indentation_of_search_and_replace():
    text = (
        "<tool: edit>\na.py\n<<<<<<< SEARCH\n    if x < 1:\n        pass\n=======\n    if x <= 1:\n"
        ">>>>>>> REPLACE\n</tool>"
    )
    call = parse_tool_call(text)
    assert call.search == "    if x < 1:\n        pass"
    assert call.text == "    if x <= 1:"


def test_create_body_may_mention_the_closing_tag():
    call = parse_tool_call("<tool: create>\ndoc.md\nwrite </tool> on its own line:\n</tool>\n</tool>")
    assert call.arg == "doc.md"
    assert call.text == "write </tool> on its own line:\n</tool>\n"


def test_submit():
    assert parse_tool_call("done\n<tool: submit>\n</tool>").name == "submit"


def test_every_example_in_the_prompt_parses():
    blocks = TOOL_DOC.split("\n\n")[1:]
    names = [parse_tool_call(block).name for block in blocks]
    assert names == ["bash", "view", "edit", "create", "submit"]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("I think the bug is in a.py.", "No tool call"),
        ("<tool: python>\nprint(1)\n</tool>", "Unknown tool 'python'"),
        ("<tool: bash>\nls\n", "no closing"),
        ("<tool: bash>\nls\n</tool>\nand then I will", "Text after"),
        ("<tool: bash>\n\n</tool>", "needs a command"),
        ("  <tool: bash>\nls\n</tool>", "No tool call"),
        ("<tool: view>\n\n</tool>", "needs a file path"),
        ("<tool: view>\na.py\nlines 1 to 5\n</tool>", "START END"),
        ("<tool: view>\na.py\n9 3\n</tool>", "is empty"),
        ("<tool: edit>\na.py\nold\n=======\nnew\n>>>>>>> REPLACE\n</tool>", "exactly one"),
        ("<tool: edit>\na.py\n<<<<<<< SEARCH\n=======\nnew\n>>>>>>> REPLACE\n</tool>", "SEARCH text is empty"),
        ("<tool: submit>\nnow\n</tool>", "no arguments"),
    ],
)
def test_malformed_calls_are_refused_with_a_reason(text, reason):
    with pytest.raises(ToolFormatError, match=reason):
        parse_tool_call(text)
