"""The commit a remote training ships: which project it is (`Project`: a local git checkout or a git
URL, plus the subdirectory holding its MLproject), resolve the commit to a full SHA, archive its tree
with `git archive` (no .git, so the node needs no repository credentials), and check the MLproject
has the entry point and parameters asked for, so a typo fails here rather than on the node.

A git URL is fetched on the control side (into a temporary bare repository, gone when the call
ends): the node never talks to the git server, and exactly the named commit travels. The project is
recorded as the user named it (credentials in a URL's userinfo are stripped first): the training run
is tagged with it, and the monitor's retrain names it again.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from flywheel.core.errors import FlywheelError
from flywheel.core.files import yaml_problem

if TYPE_CHECKING:
    from flywheel.training.dispatch.job import RemoteTrainConfig

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SCP_RE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:(?!//)")  # git@github.com:team/model.git
_DIR_RE = re.compile(r"^[A-Za-z0-9._/-]+$")


def is_git_url(project: str) -> bool:
    """Whether `project` names a git remote (scheme://… or scp-like user@host:path) rather than a path."""
    return bool(_URL_RE.match(project) or _SCP_RE.match(project))


def redact_url(project: str) -> str:
    """`project` without a password or token in a URL's userinfo (it is logged and tagged)."""
    if not _URL_RE.match(project):
        return project
    parts = urlsplit(project)
    if parts.username is None and parts.password is None:
        return project
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def normalize_project_dir(project_dir: str) -> str:
    """The MLproject's directory inside the repository as a clean relative POSIX path ("." = root)."""
    text = (project_dir or ".").strip()
    norm = posixpath.normpath(text)
    if (not _DIR_RE.match(text) or text.startswith("/") or norm == ".." or norm.startswith("../")):
        raise FlywheelError(f"--project-dir {project_dir!r} must be a relative path inside the repository "
                            "(letters, digits, . _ - /), e.g. examples/fashion-mnist")
    return norm


@dataclass(frozen=True)
class Project:
    """What `remote-train` trains: a project as the user named it (`name`: a checkout's path or a git
    URL) and the subdirectory holding its MLproject (`project_dir`, "." = the repository root)."""

    name: str = "."
    project_dir: str = "."

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise FlywheelError("--project is empty: give a git checkout's path or a git URL")
        object.__setattr__(self, "project_dir", normalize_project_dir(self.project_dir))

    @property
    def is_url(self) -> bool:
        return is_git_url(self.name)

    @property
    def label(self) -> str:
        """The project as recorded (tags, logs, the retrain payload): as named, credentials stripped."""
        return redact_url(self.name)

    def entry_path(self, name: str = "MLproject") -> str:
        """`name` inside the project directory, as a path in the commit's tree."""
        return name if self.project_dir == "." else f"{self.project_dir}/{name}"

    @contextmanager
    def checkout(self, commit: str) -> Iterator[tuple[Path, str]]:
        """(a git directory holding `commit`, its full SHA). A local checkout is used in place; a URL
        is fetched into a temporary bare repository that is removed when the block ends."""
        if not self.is_url:
            repo = Path(self.name).expanduser()
            yield repo, resolve_commit(repo, commit)
            return
        with tempfile.TemporaryDirectory(prefix="flywheel-project-") as tmp:
            yield Path(tmp), fetch_commit(self.name, commit, Path(tmp))


def _git(repo: Path, *args: str, binary: bool = False) -> subprocess.CompletedProcess:
    # Never wait for a password on a terminal nobody watches (CI, the monitor's trigger).
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        return subprocess.run(["git", "-C", str(repo), *args], check=False, capture_output=True, text=not binary,
                              env=env)
    except FileNotFoundError as exc:
        raise FlywheelError("git is not installed; remote-train ships commits with `git archive`") from exc


def resolve_commit(repo: Path, commit: str) -> str:
    """Full SHA of `commit` (SHA, prefix, branch or tag) in `repo`; clear error if unknown."""
    done = _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if done.returncode != 0:
        if _git(repo, "rev-parse", "--git-dir").returncode != 0:
            raise FlywheelError(f"{repo} is not a git repository: pass --project with the project's checkout "
                                "or its git URL")
        raise FlywheelError(f"unknown commit {commit!r} in {repo}: check the SHA, or `git fetch` it first")
    return done.stdout.strip()


def fetch_commit(url: str, commit: str, bare: Path) -> str:
    """Fetch `commit` (full SHA, branch or tag) of the repository at `url` into the new bare repository
    `bare`; returns its full SHA. A full SHA is fetched alone (shallow) where the server allows it;
    otherwise every branch and tag is fetched and the commit looked up among them."""
    label = redact_url(url)
    init = _git(bare, "init", "--bare", "-q")
    if init.returncode != 0:
        raise FlywheelError(f"cannot create a git repository in {bare}: {init.stderr.strip()}")
    if re.fullmatch(r"[0-9a-f]{40}", commit):
        if _git(bare, "fetch", "-q", "--depth=1", "--no-tags", url, commit).returncode == 0:
            return resolve_commit(bare, commit)
    done = _git(bare, "fetch", "-q", "--no-tags", url, "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
    if done.returncode != 0:
        err = done.stderr.replace(url, label).strip().splitlines()
        raise FlywheelError(f"cannot fetch {label}: {err[-1] if err else 'git fetch failed'} "
                            "(check the URL and that this machine can read it)")
    done = _git(bare, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if done.returncode != 0:
        raise FlywheelError(f"unknown commit {commit!r} in {label}: no branch, tag or commit of that name")
    return done.stdout.strip()


def archive_commit(repo: Path, sha: str) -> bytes:
    """The commit's tree as a .tar.gz (no .git: the node needs no repository credentials). The whole
    repository travels, so a project in a subdirectory can still use files next to it."""
    done = _git(repo, "archive", "--format=tar.gz", sha, binary=True)
    if done.returncode != 0:
        raise FlywheelError(f"git archive {sha} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def check_entry(repo: Path, sha: str, cfg: RemoteTrainConfig, project_dir: str = ".") -> None:
    """Fail here, not on the node, if the commit's MLproject lacks the entry point or a -P parameter."""
    import yaml

    path = "MLproject" if project_dir == "." else f"{project_dir}/MLproject"
    where = "its root" if project_dir == "." else project_dir
    done = _git(repo, "show", f"{sha}:{path}")
    if done.returncode != 0:
        raise FlywheelError(f"commit {sha[:12]} has no MLproject at {where}; remote-train runs `mlflow run` "
                            "(point --project-dir at the directory that holds it)")
    try:
        entries = (yaml.safe_load(done.stdout) or {}).get("entry_points") or {}
    except yaml.YAMLError as exc:
        raise FlywheelError(f"{path} at {sha[:12]} is not valid YAML: {yaml_problem(exc)}") from None
    if cfg.entry not in entries:
        raise FlywheelError(f"{path} at {sha[:12]} has no entry point {cfg.entry!r}; it has: "
                            f"{', '.join(entries) or 'none'}")
    declared = set((entries[cfg.entry] or {}).get("parameters") or {})
    wanted = [k for k, _ in cfg.params] + (["nproc_per_node"] if cfg.nproc_per_node is not None else [])
    # MLflow would append undeclared parameters as extra --flags, which the entry then rejects.
    unknown = [k for k in wanted if k not in declared]
    if unknown:
        raise FlywheelError(f"entry point {cfg.entry!r} of {path} at {sha[:12]} has no parameter(s) "
                            f"{', '.join(unknown)}; it takes: {', '.join(sorted(declared)) or 'none'}")
