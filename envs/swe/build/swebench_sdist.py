"""A SWE-bench instance materialised from a PyPI sdist instead of its prebuilt image.

Without GitHub or an image registry, the repository at `base_commit` cannot be fetched; a
release's sdist is a stand-in when it holds the same files the instance's patches touch. This
checks exactly that (both the gold patch and the test patch must apply to the sdist) and says
which file differs when they do not, then points the instance at the sdist and a bundle of its
test dependencies so that it runs in the plain Python sandbox image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from envs.swe.build.pypi import fetch_deps, fetch_sdist, read_tree, sdist_prefix
from envs.swe.diffs import PatchError, apply_diff, touched_paths
from envs.swe.official import default_image
from envs.swe.task import SourceSpec, SWETask


def sdist_tree(task: SWETask, package: str, cache: Path) -> tuple[Path, dict[str, bytes]]:
    """The sdist of `package` (NAME==VERSION) and its files, after checking that the task's gold
    patch and test patch both apply to them; ValueError naming the patch and file that do not."""
    sdist = fetch_sdist(package, cache)
    tree = read_tree(sdist, sdist_prefix(sdist))
    for name in ("patch", "test_patch"):
        diff = getattr(task, name)
        reads, _ = touched_paths(diff)
        try:
            apply_diff({p: tree[p] for p in reads if p in tree}, diff)
        except PatchError as err:
            raise ValueError(
                f"The sdist of {package} is not the repository of {task.instance_id} at {task.base_commit[:12]}: "
                f"its {name} does not apply ({err}); what is missing is the repository at that commit, or "
                f"SWE-bench's image {default_image(task)}."
            ) from None
    return sdist, tree


def import_roots(tree: dict[str, bytes]) -> list[str]:
    """The repository folders its package imports from: `src` for a src layout, else the root."""
    return ["src"] if any(p.startswith("src/") for p in tree) else ["."]


def from_sdist(task: SWETask, package: str, deps: list[str], cache: Path, out_dir: Path) -> SWETask:
    """`task` with `source` set to the sdist of `package` (NAME==VERSION) copied into
    `out_dir/sources`; ValueError naming the patch and file that do not match."""
    sources = out_dir / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    found, tree = sdist_tree(task, package, cache)
    sdist = Path(shutil.copy2(found, sources))
    bundle = Path(shutil.copy2(fetch_deps(deps, cache), sources)) if deps else None
    source = SourceSpec(
        tarball=str(sdist),
        prefix=sdist_prefix(sdist),
        deps=str(bundle) if bundle else None,
        pythonpath=import_roots(tree),
    )
    return task.model_copy(update={"source": source})
