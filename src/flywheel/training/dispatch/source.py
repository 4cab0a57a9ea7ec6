"""The commit a remote training ships: resolve it to a full SHA, archive its tree with `git archive`
(no .git, so the node needs no repository credentials), and check its MLproject has the entry point
and parameters asked for, so a typo fails here rather than on the node.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.core.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.training.dispatch.job import RemoteTrainConfig


def _git(repo: Path, *args: str, binary: bool = False) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], check=False, capture_output=True, text=not binary)
    except FileNotFoundError as exc:
        raise FlywheelError("git is not installed; remote-train ships commits with `git archive`") from exc


def resolve_commit(repo: Path, commit: str) -> str:
    """Full SHA of `commit` (SHA, prefix, branch or tag) in `repo`; clear error if unknown."""
    done = _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if done.returncode != 0:
        if _git(repo, "rev-parse", "--git-dir").returncode != 0:
            raise FlywheelError(f"{repo} is not a git repository: pass --repo with the project's checkout")
        raise FlywheelError(f"unknown commit {commit!r} in {repo}: check the SHA, or `git fetch` it first")
    return done.stdout.strip()


def archive_commit(repo: Path, sha: str) -> bytes:
    """The commit's tree as a .tar.gz (no .git: the node needs no repository credentials)."""
    done = _git(repo, "archive", "--format=tar.gz", sha, binary=True)
    if done.returncode != 0:
        raise FlywheelError(f"git archive {sha} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def check_entry(repo: Path, sha: str, cfg: RemoteTrainConfig) -> None:
    """Fail here, not on the node, if the commit's MLproject lacks the entry point or a -P parameter."""
    import yaml

    done = _git(repo, "show", f"{sha}:MLproject")
    if done.returncode != 0:
        raise FlywheelError(f"commit {sha[:12]} has no MLproject at its root; remote-train runs `mlflow run`")
    try:
        entries = (yaml.safe_load(done.stdout) or {}).get("entry_points") or {}
    except yaml.YAMLError as exc:
        raise FlywheelError(f"MLproject at {sha[:12]} is not valid YAML: {exc}") from exc
    if cfg.entry not in entries:
        raise FlywheelError(f"MLproject at {sha[:12]} has no entry point {cfg.entry!r}; it has: "
                            f"{', '.join(entries) or 'none'}")
    declared = set((entries[cfg.entry] or {}).get("parameters") or {})
    wanted = [k for k, _ in cfg.params] + (["nproc_per_node"] if cfg.nproc_per_node is not None else [])
    # MLflow would append undeclared parameters as extra --flags, which the entry then rejects.
    unknown = [k for k in wanted if k not in declared]
    if unknown:
        raise FlywheelError(f"entry point {cfg.entry!r} of MLproject at {sha[:12]} has no parameter(s) "
                            f"{', '.join(unknown)}; it takes: {', '.join(sorted(declared)) or 'none'}")
