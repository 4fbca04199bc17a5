"""`codeworld swe build-image`: an image in SWE-bench's official layout for one instance, with a
release's sdist standing in for the repository (as `from-sdist` does), built offline on the
local sandbox image so that official-layout instances run end to end where no registry is.

The layout SWE-bench's evaluation scripts and images use:

* `/testbed`: the repository, a git repository whose base commit answers to the instance's
  `base_commit` (a `refs/replace/<base_commit>` ref names the sdist's commit), so the evaluation
  script's `git checkout <base_commit> <test files>` and `git diff <base_commit>` work;
* `/opt/miniconda3/bin/activate` and `/opt/miniconda3/envs/testbed`: `source .../activate` then
  `conda activate testbed` activate the test environment. It is a Python virtual environment
  (the image's Python 3.11, its Debian pytest visible) with the dependencies installed from PyPI
  wheels and the repository importable in place (a `.pth`, and package metadata, as `pip install
  -e .` leaves); `conda` is a small shell function that does only `activate` and `deactivate`;
* git, from Debian's packages fetched on the host with apt (the image build itself has no
  network).

Two steps, each cached: the SWE base image (the sandbox image plus git and the activation script;
once per node) and the instance image (labelled with the hash of everything it was made from, so
an unchanged instance is never rebuilt). Image names follow the official harness's
(`official.image_for`), or `--tag`.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
from pydantic import BaseModel

from envs.swe.build.pypi import executable_paths, fetch_deps, parse_spec, sdist_prefix
from envs.swe.build.swebench_sdist import import_roots, sdist_tree
from envs.swe.official import CONDA_ROOT, ENV_PATH, REPO_DIR
from envs.swe.task import SWETask
from workers.sandbox.images import split_reference

SWE_BASE = "codeworld-swe-base:py311"
SANDBOX_BASE = "codeworld-sandbox:py311"
RECIPE_LABEL = "codeworld.swe.recipe"
BUILDER_VERSION = "2"
"""Part of every recipe hash: bump it when what the builder puts in an image changes."""
_GIT_ROOT_PACKAGES = ("git",)
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_SAFE_PATH = re.compile(r"^[^/\0\n][^\0\n]*$")
_PYTHON = f"{ENV_PATH}/bin/python"
# What SWE-bench's scripts use of conda: `source /opt/miniconda3/bin/activate` defines `conda`,
# `conda activate NAME` activates /opt/miniconda3/envs/NAME. Safe under `set -u`.
ACTIVATE = r"""# codeworld's stand-in for Miniconda's activate script (see envs/swe/build/image.py): only
# `conda activate NAME` and `conda deactivate`, over the virtual environments in envs/.
conda() {
    case "${1:-}" in
        activate)
            local name="${2:-base}" root=/opt/miniconda3
            [ "$name" = base ] && return 0
            if [ ! -x "$root/envs/$name/bin/python" ]; then
                echo "conda: no environment named $name" >&2
                return 1
            fi
            conda deactivate
            export CONDA_DEFAULT_ENV="$name" CONDA_PREFIX="$root/envs/$name" VIRTUAL_ENV="$root/envs/$name"
            export PATH="$root/envs/$name/bin:$PATH"
            ;;
        deactivate)
            if [ -n "${CONDA_PREFIX:-}" ]; then
                PATH=$(printf %s "$PATH" | tr ':' '\n' | grep -vxF "$CONDA_PREFIX/bin" | paste -sd: -)
                export PATH
                unset CONDA_DEFAULT_ENV CONDA_PREFIX VIRTUAL_ENV
            fi
            ;;
        *) echo "conda: only 'conda activate NAME' and 'conda deactivate' exist here" >&2; return 1 ;;
    esac
}
"""
_PYTEST_SCRIPT = f"#!{_PYTHON}\nimport sys\nfrom pytest import console_main\nsys.exit(console_main())\n"


class BuiltImage(BaseModel):
    """One instance image, built or found in the cache."""

    tag: str
    """Its name."""
    image_id: str
    """Docker's id of it."""
    cached: bool
    """True when an image of the same recipe was already there (nothing was built)."""
    seconds: float
    """Time this call took."""
    size_mb: float
    """The image's size (shared layers included)."""


def _client() -> docker.DockerClient:
    return docker.from_env(timeout=600)


def _run(argv: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise RuntimeError(f"{what} failed ({' '.join(argv[:3])} ...): {' | '.join(tail)}")
    return proc.stdout


def _in_container(
    client: docker.DockerClient,
    image: str,
    script: str,
    inputs: dict[Path, str],
    commit: tuple[str, list[str]] | None = None,
) -> str:
    """Runs `script` as root in a fresh container of `image` without network, the host folders
    `inputs` copied in first (and removed after the script), and commits the result as `commit`
    (name, Dockerfile changes). Copied, not mounted: `docker commit` turns a mount into a VOLUME of
    the image, and every container of it would then get anonymous volumes."""
    cleanup = " ".join(shlex.quote(inside) for inside in inputs.values())
    container = client.containers.create(
        image, ["sh", "-c", f"{script}\nrm -rf {cleanup}"], network_mode="none", user="0:0", working_dir="/"
    )
    try:
        for host, inside in inputs.items():
            container.put_archive(posixpath.dirname(inside), _tar_of(host, posixpath.basename(inside)))
        container.start()
        status = container.wait(timeout=900)["StatusCode"]
        logs = container.logs().decode(errors="replace")
        if status != 0:
            raise RuntimeError(f"building on {image} failed (exit {status}): {logs[-1500:]}")
        if commit is not None:
            repository, tag = split_reference(commit[0])
            container.commit(repository, tag, changes=commit[1])
        return logs
    finally:
        container.remove(force=True, v=True)


def _tar_of(folder: Path, name: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=name)
    return buffer.getvalue()


def _git_debs(client: docker.DockerClient, folder: Path) -> list[Path]:
    """Debian packages git needs beyond what the sandbox image has, downloaded with the host's
    apt (the image is Debian bookworm, like the hosts codeworld supports)."""
    if shutil.which("apt-get") is None or shutil.which("apt-cache") is None:
        raise RuntimeError("building the SWE base image needs Debian's apt on the host, to fetch git's packages.")
    installed = set(
        client.containers.run(
            SANDBOX_BASE, ["dpkg-query", "-W", "-f", "${Package}\\n"], remove=True, network_mode="none"
        )
        .decode()
        .split()
    )
    tree = _run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *_GIT_ROOT_PACKAGES,
        ],
        "apt-cache depends",
    )
    names = sorted(
        {line.split(":")[0] for line in tree.splitlines() if line and not line.startswith((" ", "<"))} - installed
    )
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.deb"):
        old.unlink()
    _run(["apt-get", "download", "-q", *names], "apt-get download", cwd=folder)
    return sorted(folder.glob("*.deb"))


def ensure_swe_base(cache: Path, echo: Callable[[str], None] = print) -> str:
    """The SWE base image's id, built unless present: the sandbox image with git and the
    activation script."""
    client = _client()
    parts = [BUILDER_VERSION, ACTIVATE, *_GIT_ROOT_PACKAGES]
    recipe = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    try:
        found = client.images.get(SWE_BASE)
        if found.labels.get(RECIPE_LABEL) == recipe:
            return found.id
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.get(SANDBOX_BASE)
    except docker.errors.ImageNotFound:
        raise RuntimeError(
            f"the sandbox image {SANDBOX_BASE} does not exist; build it first with `codeworld sandbox build-image`."
        ) from None
    echo(f"codeworld: building {SWE_BASE} (git from Debian, the conda activation script) ...")
    with tempfile.TemporaryDirectory(prefix="codeworld-swe-base-") as tmp:
        debs, shim = Path(tmp) / "debs", Path(tmp) / "shim"
        names = [d.name for d in _git_debs(client, debs)]
        shim.mkdir()
        (shim / "activate").write_text(ACTIVATE)
        script = (
            "set -e; export PATH=/usr/sbin:/usr/bin:/sbin:/bin; dpkg -i /mnt/debs/*.deb >/dev/null; "
            f"mkdir -p {CONDA_ROOT}/bin {CONDA_ROOT}/envs; cp /mnt/shim/activate {CONDA_ROOT}/bin/activate; "
            f"chmod 755 {CONDA_ROOT}/bin/activate; rm -rf /var/cache/apt/archives/*.deb; git --version"
        )
        changes = [f"LABEL codeworld.swe.base.packages={','.join(names)}", f"LABEL {RECIPE_LABEL}={recipe}"]
        logs = _in_container(client, SANDBOX_BASE, script, {debs: "/mnt/debs", shim: "/mnt/shim"}, (SWE_BASE, changes))
    echo(f"codeworld: {SWE_BASE} ready ({logs.strip().splitlines()[-1]}).")
    return client.images.get(SWE_BASE).id


def _recipe(task: SWETask, sdist: Path, deps: list[str], base_id: str) -> str:
    parts = [
        BUILDER_VERSION,
        base_id,
        hashlib.sha256(sdist.read_bytes()).hexdigest(),
        *sorted(deps),
        task.instance_id,
        task.base_commit,
        ACTIVATE,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def build_instance_image(
    task: SWETask, package: str, deps: list[str], cache: Path, tag: str, echo: Callable[[str], None] = print
) -> BuiltImage:
    """The official-layout image of `task` as `tag`, from the sdist of `package` (checked against
    the task's patches) and the wheels of `deps`; reused when an image of the same recipe exists."""
    start = time.perf_counter()
    sdist, tree = sdist_tree(task, package, cache)
    base_id = ensure_swe_base(cache, echo)
    client = _client()
    recipe = _recipe(task, sdist, deps, base_id)
    try:
        found = client.images.get(tag)
        if found.labels.get(RECIPE_LABEL) == recipe:
            return BuiltImage(
                tag=tag,
                image_id=found.id,
                cached=True,
                seconds=time.perf_counter() - start,
                size_mb=found.attrs["Size"] / 1e6,
            )
    except docker.errors.ImageNotFound:
        pass
    echo(f"codeworld: building {tag} for {task.instance_id} from {package} ...")
    with tempfile.TemporaryDirectory(prefix="codeworld-swe-image-") as tmp:
        ctx = Path(tmp)
        _write_testbed(ctx / "testbed", tree, executable_paths(sdist, sdist_prefix(sdist)), task, package)
        _write_env(ctx, task, package, fetch_deps(deps, cache) if deps else None, import_roots(tree))
        script = (
            f"set -e; cp -a /mnt/ctx/testbed {REPO_DIR}; "
            f"python3 -m venv --without-pip --system-site-packages {ENV_PATH}; "
            f"site=$({_PYTHON} -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'); "
            f'cp -a /mnt/ctx/site/. "$site/"; cp -a /mnt/ctx/bin/. {ENV_PATH}/bin/; '
            f"chown -R 0:0 {REPO_DIR} {ENV_PATH}; chmod -R a+rX,go-w {REPO_DIR} {CONDA_ROOT}"
        )
        changes = [
            f"WORKDIR {REPO_DIR}",
            f"LABEL {RECIPE_LABEL}={recipe}",
            f"LABEL codeworld.swe.instance={task.instance_id}",
            f"LABEL codeworld.swe.stand_in=sdist:{package}",
        ]
        _in_container(client, base_id, script, {ctx: "/mnt/ctx"}, (tag, changes))
    image = client.images.get(tag)
    seconds = time.perf_counter() - start
    echo(f"codeworld: {tag} ready in {seconds:.1f} s ({image.attrs['Size'] / 1e6:.0f} MB).")
    return BuiltImage(tag=tag, image_id=image.id, cached=False, seconds=seconds, size_mb=image.attrs["Size"] / 1e6)


def _write_testbed(folder: Path, tree: dict[str, bytes], executables: set[str], task: SWETask, package: str) -> None:
    """The repository as a git repository whose commit stands for `task.base_commit`."""
    for rel, data in tree.items():
        parts = rel.split("/")
        if not _SAFE_PATH.match(rel) or ".." in parts or ".git" in parts:
            raise ValueError(f"the sdist of {package} holds the path {rel[:200]!r}, which cannot be part of /testbed.")
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if rel in executables else 0o644)
    env = {
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "HOME": str(folder),
        "GIT_CEILING_DIRECTORIES": str(folder.parent),
        "PATH": "/usr/bin:/bin",
    }
    message = f"{task.repo} at {task.base_commit or 'its base'} (stood in for by the sdist {package})"
    for argv in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        [
            "git",
            "-c",
            "user.name=codeworld",
            "-c",
            "user.email=codeworld@localhost",
            "commit",
            "-q",
            "--no-verify",
            "-m",
            message,
        ],
    ):
        _run(argv, "preparing /testbed", cwd=folder, env=env)
    if _HEX40.match(task.base_commit):
        _run(
            ["git", "update-ref", f"refs/replace/{task.base_commit}", "HEAD"],
            "preparing /testbed",
            cwd=folder,
            env=env,
        )


def _write_env(ctx: Path, task: SWETask, package: str, deps: Path | None, roots: list[str]) -> None:
    """site/ (dependencies, the repository's `.pth` and metadata) and bin/ (their scripts)."""
    site, bin_dir = ctx / "site", ctx / "bin"
    site.mkdir()
    if deps is not None:
        with tarfile.open(deps, "r:gz") as tar:
            tar.extractall(site, filter="data")
    if (site / "bin").is_dir():
        shutil.move(site / "bin", bin_dir)
    bin_dir.mkdir(exist_ok=True)
    for script in bin_dir.iterdir():
        lines = script.read_bytes().split(b"\n", 1)
        if lines[0].startswith(b"#!") and b"python" in lines[0]:  # pip wrote the host's interpreter here
            script.write_bytes(f"#!{_PYTHON}".encode() + (b"\n" + lines[1] if len(lines) > 1 else b"\n"))
    if not (bin_dir / "pytest").exists():
        (bin_dir / "pytest").write_text(_PYTEST_SCRIPT)
        (bin_dir / "pytest").chmod(0o755)
    name, version = parse_spec(package)
    (site / "codeworld_testbed.pth").write_text("".join(f"{REPO_DIR}/{r}".removesuffix("/.") + "\n" for r in roots))
    meta = site / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (meta / "INSTALLER").write_text("codeworld\n")
    (meta / "RECORD").write_text("")
    (meta / "direct_url.json").write_text(json.dumps({"url": f"file://{REPO_DIR}", "dir_info": {"editable": True}}))
