"""The docs stay true to the repository: links resolve, the architecture diagram exists, every secret
and variable the workflows read is documented, and every CLI verb of the project's vocabulary answers
`--help`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
WORKFLOWS = REPO / ".github" / "workflows"
# The CLI vocabulary (DESIGN.md "One vocabulary"); `data snapshot` is a sub-command.
VERBS = ("train", "evaluate", "register", "tune", "package", "release", "predict", "remote-train", "stack", "doctor",
         "monitor", "data snapshot", "demo", "serve-keys renew", "serve-pool")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _markdown_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [p for p in (REPO / "README.md", REPO / "benchmarks" / "README.md")
                                         if p.exists()]


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (except - and _), spaces → '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def test_docs_exist():
    for name in ("index", "architecture", "quickstart", "github", "security", "troubleshooting"):
        assert (DOCS / f"{name}.md").is_file(), name


def test_every_relative_link_resolves():
    broken = []
    for md in _markdown_files():
        text = FENCE.sub("", md.read_text())
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            if not dest.exists():
                broken.append(f"{md.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{md.relative_to(REPO)}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_architecture_has_a_mermaid_diagram_of_every_node():
    text = (DOCS / "architecture.md").read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", text, re.S)
    assert blocks, "docs/architecture.md needs a ```mermaid block"
    diagram = blocks[0]
    assert diagram.lstrip().startswith(("flowchart", "graph"))
    # Structure mermaid would reject: unbalanced subgraphs or brackets.
    assert len(re.findall(r"^\s*subgraph\b", diagram, re.M)) == len(re.findall(r"^\s*end\s*$", diagram, re.M))
    for open_, close in ("[]", "()", "{}"):
        assert diagram.count(open_) == diagram.count(close), open_ + close
    for node in ("training node", "tracking node", "serving nodes", "monitor node", "GitHub"):
        assert node in diagram, node
    for flow in ("remote-train", "mlflow run", "Postgres", "GCS", "TorchServe", "capture", "drift",
                 "repository_dispatch", "set-default", "alias"):
        assert flow in diagram, flow


def _workflow_names(kind: str) -> set[str]:
    names: set[str] = set()
    for wf in WORKFLOWS.glob("*.y*ml"):
        names |= set(re.findall(rf"\b{kind}\.([A-Za-z_][A-Za-z0-9_]*)", wf.read_text()))
    return names - {"GITHUB_TOKEN"}  # provided by Actions itself


def test_every_workflow_secret_and_variable_is_documented():
    secrets, variables = _workflow_names("secrets"), _workflow_names("vars")
    assert {"MLFLOW_TRACKING_URI", "FLYWHEEL_SSH_KEY"} <= secrets  # the parse still finds what it must
    github_md = (DOCS / "github.md").read_text()
    documented = set(re.findall(r"^\|\s*`([A-Z0-9_]+)`", github_md, re.M))
    documented |= set(re.findall(r"^\|\s*`[A-Z0-9_]+`,\s*`([A-Z0-9_]+)`", github_md, re.M))
    missing = sorted((secrets | variables) - documented)
    assert not missing, f"used by .github/workflows but not in a docs/github.md table row: {missing}"
    environments = set()
    for wf in WORKFLOWS.glob("*.y*ml"):
        environments |= set(re.findall(r"environment:\s*([a-z]+)\s*$", wf.read_text(), re.M))
        environments |= set(re.findall(r"options:\s*\[([^\]]*dev[^\]]*)\]", wf.read_text()))
    for env in ("dev", "prod"):
        assert f"**`{env}`**" in github_md, f"environment {env} not described"


@pytest.mark.parametrize("verb", VERBS)
def test_every_cli_verb_has_help(verb):
    from typer.testing import CliRunner

    from flywheel.cli import app

    result = CliRunner().invoke(app, [*verb.split(), "--help"])
    assert result.exit_code == 0, f"`flywheel {verb} --help` failed:\n{result.output}"
    assert "Usage:" in result.output and "--help" in result.output


def test_cli_entry_point_help_is_fast():
    """`flywheel --help` through the installed entry point lists every verb (imports stay lazy)."""
    exe = Path(sys.executable).with_name("flywheel")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60,
                         env={"PATH": str(exe.parent), "COLUMNS": "200", "TERM": "dumb"})
    assert out.returncode == 0, out.stderr
    for verb in VERBS:
        assert verb.split()[0] in out.stdout, verb
