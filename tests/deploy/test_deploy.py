"""Every file in deploy/ against the schema of its kind, so a mistyped field fails here rather than
on a cluster: Ray's own cluster-config schema (as `ray up` applies it), the KubeRay CRD fields
(tests/deploy/kuberay_schema.py), `bash -n` for scripts, and Dockerfile syntax. The run configs
the manifests carry are loaded as codeworld configs. deploy/local is also run for real by
tests/e2e/test_cluster.py."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from kuberay_schema import SCHEMAS
from rl.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent
SCRIPTS = sorted([*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch")])
DOCKERFILES = {  # each with the build context its header documents
    DEPLOY / "docker" / "Dockerfile.cpu": REPO,
    DEPLOY / "docker" / "Dockerfile.cuda": REPO,
    DEPLOY / "local" / "Dockerfile": DEPLOY / "local",
    DEPLOY / "sandbox" / "Dockerfile": DEPLOY / "sandbox",
}
INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


def test_every_deploy_file_is_checked_here() -> None:
    checked = {*SCRIPTS, *DOCKERFILES, DEPLOY / "ray" / "cluster.yaml", *DEPLOY.glob("k8s/*.yaml")}
    files = {p for p in DEPLOY.rglob("*") if p.is_file()}
    assert files == checked, f"deploy files no test checks: {sorted(map(str, files - checked))}"


def _ray_up_config(config: dict) -> None:
    """What `ray up` does to a cluster config before it touches a node: defaults, then the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_the_ray_cluster_config_passes_rays_own_validation() -> None:
    config = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    _ray_up_config(config)
    assert config["docker"]["image"].endswith("codeworld-cuda:latest")
    for key, value in (
        ("docker", {**config["docker"], "imag": "x"}),
        ("max_worker", 2),
        ("head_start_ray_command", ["ray start --head"]),
    ):
        with pytest.raises(jsonschema.ValidationError, match="was unexpected"):  # a mistyped key
            _ray_up_config({**config, key: value})


def _manifests() -> list[tuple[str, dict]]:
    return [
        (f"{p.name}#{i}", doc)
        for p in sorted(DEPLOY.glob("k8s/*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(p.read_text()))
        if doc is not None
    ]


@pytest.mark.parametrize("where, doc", _manifests(), ids=[w for w, _ in _manifests()])
def test_kubernetes_manifests_match_the_kuberay_crd_fields(where: str, doc: dict) -> None:
    schema = SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    assert schema is not None, f"{where}: no schema for {doc.get('apiVersion')} {doc.get('kind')}"
    jsonschema.validate(doc, schema)
    for run_config in (doc.get("data") or {}).values():  # a run config in a ConfigMap is ours
        load_config_text(run_config)


def load_config_text(text: str) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        load_config(f.name)


def test_mistyped_kuberay_fields_fail() -> None:
    cluster = next(doc for _, doc in _manifests() if doc["kind"] == "RayCluster")
    schema = SCHEMAS[("ray.io/v1", "RayCluster")]
    for path, value in (
        (["spec", "workerGroupSpec"], []),
        (["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 8),
        (["spec", "workerGroupSpecs", 0, "replica"], 2),
        (["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resource"], {}),
        (["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits", "memory"], "lots"),
    ):
        bad = copy.deepcopy(cluster)
        node = bad
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(DEPLOY)) for s in SCRIPTS])
def test_scripts_parse(script: Path) -> None:
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    out = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word, rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", list(DOCKERFILES), ids=[str(d.relative_to(DEPLOY)) for d in DOCKERFILES])
def test_dockerfiles_are_well_formed(dockerfile: Path) -> None:
    steps = _instructions(dockerfile.read_text())
    words = [w for w, _ in steps]
    assert set(words) <= INSTRUCTIONS, f"unknown or lower-case instructions: {set(words) - INSTRUCTIONS}"
    assert words[0] in ("FROM", "ARG") and "FROM" in words
    before_from = {a.split("=")[0] for w, a in steps[: words.index("FROM")] if w == "ARG"}
    for word, args in steps:
        if word == "FROM":
            assert set(re.findall(r"\$\{(\w+)\}", args)) <= before_from, args
        elif word == "RUN":  # shell syntax of every RUN
            check = subprocess.run(["bash", "-n", "-c", args], capture_output=True, text=True)
            assert check.returncode == 0, f"RUN {args[:80]}: {check.stderr}"
        elif word in ("CMD", "ENTRYPOINT") and args.startswith("["):
            assert all(isinstance(x, str) for x in json.loads(args))
        elif word in ("COPY", "ADD"):
            *sources, _dest = [a for a in shlex.split(args) if not a.startswith("--")]
            for source in sources:
                assert (DOCKERFILES[dockerfile] / source).exists(), f"COPY source {source} is not in the context"
        elif word == "ENV":
            assert all("=" in pair for pair in shlex.split(args)), f"ENV {args}: write KEY=value"
