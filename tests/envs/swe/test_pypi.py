"""Sdists and dependency bundles come from PyPI through pip, once: later runs use the cache."""

import tarfile

import pytest

from envs.swe.build.pypi import fetch_deps, fetch_sdist, parse_spec, read_tree, sdist_prefix


def test_spec_must_pin_a_version():
    assert parse_spec("python-slugify==9.2.0") == ("python-slugify", "9.2.0")
    with pytest.raises(ValueError, match=r"Package 'toolz' must be given as NAME==VERSION"):
        parse_spec("toolz")


def test_sdist_is_downloaded_once_and_found_by_normalised_name(swe_cache):
    first = fetch_sdist("toolz==1.2.0", swe_cache)
    mtime = first.stat().st_mtime_ns
    again = fetch_sdist("Toolz==1.2.0", swe_cache)
    assert again == first and again.stat().st_mtime_ns == mtime
    assert sdist_prefix(first) == "toolz-1.2.0"
    tree = read_tree(first, "toolz-1.2.0")
    assert "toolz/itertoolz.py" in tree and "toolz/tests/test_itertoolz.py" in tree
    assert b"def groupby" in tree["toolz/itertoolz.py"]


def test_unknown_version_is_named(tmp_path):
    with pytest.raises(RuntimeError, match=r"Could not download the sdist of toolz==0\.0\.0\.1"):
        fetch_sdist("toolz==0.0.0.1", tmp_path)


def test_dependency_bundle_holds_installed_wheels(swe_cache):
    bundle = fetch_deps(["pytz"], swe_cache)
    assert fetch_deps(["pytz"], swe_cache) == bundle
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert "./pytz/__init__.py" in names
