"""`flywheel init NAME`: scaffold a component (an MLflow project Flywheel trains, serves and
retrains) from the template shipped in the package, `flywheel/templates/component/`.

The template is package data, so it ships in the wheel. Its files are stored inert — every name
ends in `.tmpl` (so no tool imports, lints or collects the template's Python) and a leading `dot-`
stands for `.` (so `.github/` and `.gitignore` survive packaging globs) — and are written with the
placeholders `__NAME__`, `__MODEL_NAME__`, `__FLYWHEEL_REPO__` and `__FLYWHEEL_REF__` replaced.
A target directory that exists and is not empty is refused: scaffolding never overwrites work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from flywheel.core.errors import FlywheelError

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
REPO_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
REF_RE = re.compile(r"^[A-Za-z0-9_./-]+$")


@dataclass(frozen=True)
class ScaffoldConfig:
    """What `flywheel init` writes: the component's name (also its registered model name unless
    `model_name` says otherwise), where, and the Flywheel repository and ref its workflows call."""

    name: str
    target: Path
    model_name: str = ""
    flywheel_repo: str = "OWNER/flywheel"  # a placeholder the user sets (README says so)
    flywheel_ref: str = "main"

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise FlywheelError(f"component name {self.name!r}: use lowercase letters, digits and '-', "
                                "starting with a letter (it names the MLflow project and the model)")
        if self.model_name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", self.model_name):
            raise FlywheelError(f"model name {self.model_name!r}: letters, digits, '_', '.', '-' only")
        if not REPO_RE.match(self.flywheel_repo):
            raise FlywheelError(f"--flywheel-repo {self.flywheel_repo!r}: expected OWNER/NAME")
        if not REF_RE.match(self.flywheel_ref):
            raise FlywheelError(f"--flywheel-ref {self.flywheel_ref!r}: expected a branch, tag or SHA")

    @property
    def substitutions(self) -> dict[str, str]:
        return {"__NAME__": self.name, "__MODEL_NAME__": self.model_name or self.name,
                "__FLYWHEEL_REPO__": self.flywheel_repo, "__FLYWHEEL_REF__": self.flywheel_ref}


def template_root() -> Traversable:
    return resources.files("flywheel").joinpath("templates", "component")


def _walk(node: Traversable, rel: tuple[str, ...] = ()):
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            if child.name != "__pycache__":
                yield from _walk(child, (*rel, child.name))
        elif child.name.endswith(".tmpl"):
            yield (*rel, child.name), child


def output_path(parts: tuple[str, ...]) -> Path:
    """A template file's path in the scaffold: `dot-x` → `.x`, the `.tmpl` suffix dropped."""
    names = [("." + p[4:]) if p.startswith("dot-") else p for p in parts]
    names[-1] = names[-1].removesuffix(".tmpl")
    return Path(*names)


def render(text: str, substitutions: dict[str, str]) -> str:
    for key, value in substitutions.items():
        text = text.replace(key, value)
    return text


def scaffold(cfg: ScaffoldConfig) -> list[Path]:
    """Write the component into `cfg.target` (created); the written files, relative to it."""
    target = cfg.target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FlywheelError(f"{target} already exists and is not empty: pick a new directory with --dir "
                            "(flywheel init never overwrites files)")
    files = list(_walk(template_root()))
    if not files:
        raise FlywheelError("the component template is missing from this flywheel installation; reinstall flywheel")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for parts, source in files:
        rel = output_path(parts)
        out = target / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(source.read_text(encoding="utf-8"), cfg.substitutions), encoding="utf-8")
        written.append(rel)
    return written
