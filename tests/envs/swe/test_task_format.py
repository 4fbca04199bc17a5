"""SWE-bench instance files are read as published; task fields resolve to the right test command,
parser, trusted files and image; problem statements come from real pytest failure output."""

import json
import subprocess
import sys

import pytest

from envs.data import data_root
from envs.swe.build.statement import failure_sections, write_statement
from envs.swe.build.tasks import detect_layout, is_test_file
from envs.swe.official import default_image
from envs.swe.task import PYTEST, load_swe_tasks

LITE = data_root() / "swebench_lite"


def test_swebench_lite_files_load_as_they_are():
    test, dev = load_swe_tasks(LITE / "test.json"), load_swe_tasks(LITE / "dev.json")
    assert (len(test), len(dev)) == (300, 23)
    assert all(t.FAIL_TO_PASS and t.image_resident() for t in test + dev)
    flask = next(t for t in test if t.instance_id == "pallets__flask-4992")
    assert flask.FAIL_TO_PASS == ["tests/test_config.py::test_config_from_file_toml"]
    runner = PYTEST.replace("{python}", "/env/bin/python")
    assert flask.resolved_test_cmd("/env/bin/python") == f"{runner} -rA tests/test_config.py"
    assert flask.trusted() == {"tests/static/config.toml", "tests/test_config.py"}


def test_repository_specific_commands_and_parsers():
    tasks = {t.repo: t for t in load_swe_tasks(LITE / "test.json")}
    django = tasks["django/django"]
    assert django.resolved_test_cmd("/py").startswith("/py ./tests/runtests.py --verbosity 2")
    assert "tests/runtests.py" in django.trusted() and "bin/test" in tasks["sympy/sympy"].trusted()
    assert all("/" not in label and not label.endswith(".py") for label in django.test_directives())
    assert django.resolved_log_parser() == "parse_log_django"
    assert tasks["sympy/sympy"].resolved_log_parser() == "parse_log_sympy"
    assert tasks["psf/requests"].resolved_log_parser() == "parse_log_pytest_options"


def test_official_image_name_follows_docker_hub_naming():
    task = next(t for t in load_swe_tasks(LITE / "test.json") if t.instance_id == "django__django-15202")
    assert default_image(task) == "swebench/sweb.eval.x86_64.django_1776_django-15202:latest"


def test_a_bad_record_is_named(tmp_path):
    rows = [
        json.loads(line)
        for line in [
            json.dumps(
                {"instance_id": "x", "repo": "r", "problem_statement": "p", "FAIL_TO_PASS": "[]", "PASS_TO_PASS": "[]"}
            ),
            json.dumps({"instance_id": "y", "repo": "r"}),
        ]
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = r"tasks.jsonl: record 1 \(y\) is not a swe-bench task \(problem_statement: Field required\)"
    with pytest.raises(ValueError, match=message):
        load_swe_tasks(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_swe_tasks(tmp_path / "missing.jsonl")


def test_layout_detection_separates_code_tests_and_config():
    tree = {
        p: b""
        for p in [
            "src/pkg/__init__.py",
            "src/pkg/core.py",
            "tests/test_core.py",
            "tests/helpers.py",
            "docs/conf.py",
            "setup.py",
            "conftest.py",
            "pyproject.toml",
            "pkg_test.py",
        ]
    }
    layout = detect_layout(tree, "pkg==1.0")
    assert layout.source_files == ["src/pkg/__init__.py", "src/pkg/core.py"]
    assert layout.test_files == ["pkg_test.py", "tests/helpers.py", "tests/test_core.py"]
    assert {"conftest.py", "pyproject.toml"} <= set(layout.trusted_files)
    assert layout.pythonpath == ["src"]
    assert not is_test_file("pkg/testing.py") and is_test_file("pkg/testing/util.py")
    with pytest.raises(ValueError, match="ships no test files"):
        detect_layout({"pkg/a.py": b""}, "pkg==1.0")


def test_statement_quotes_real_pytest_failures(tmp_path):
    (tmp_path / "test_demo.py").write_text(
        "import pytest\n\nclass TestBox:\n    def test_size(self):\n        assert len([1, 2]) == 3\n\n"
        "@pytest.mark.parametrize('n', [1])\ndef test_param(n):\n    assert n == 2\n\ndef test_ok():\n    pass\n"
    )
    log = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-rA",
            "--tb=short",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:asyncio",
            "test_demo.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout
    assert set(failure_sections(log)) == {"TestBox.test_size", "test_param[1]"}
    failing = ["test_demo.py::TestBox::test_size", "test_demo.py::test_param[1]"]
    text = write_statement("demo", "1.0", failing, log)
    assert "has 2 failing tests" in text
    assert "assert 2 == 3" in text and "assert 1 == 2" in text
    assert "test_ok" not in text
