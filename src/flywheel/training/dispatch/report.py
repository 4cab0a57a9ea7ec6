"""What a training run produced, for people: its metrics next to the champion's (the version aliased
`prod`), whether the gate made it `candidate`, its plots; as Markdown (`flywheel report`, the CI job
summary), JSON, and GitHub Actions step outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.core.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.core.config import Settings
    from flywheel.training.dispatch.job import JobResult


@dataclass(frozen=True)
class RunReport:
    run_id: str
    metrics: dict[str, float]
    champion: str | None  # "name vN" of the version aliased prod, when there is one
    champion_metrics: dict[str, float]
    candidate_version: str | None  # set when this run was registered as `candidate`
    plots: tuple[Path, ...] = ()

    def markdown(self, title: str, status: str = "") -> str:
        lines = [f"### {title}", "",
                 f"MLflow run `{self.run_id}`{status}. " +
                 (f"Registered as **candidate version {self.candidate_version}**."
                  if self.candidate_version else "Not the `candidate` (did not beat the champion)."),
                 "", f"| metric | this model | champion {self.champion or '(none)'} | change |",
                 "|---|---:|---:|---:|"]
        for key in sorted(self.metrics):
            new, old = self.metrics[key], self.champion_metrics.get(key)
            change = f"{new - old:+.4f}" if old is not None else ""
            lines.append(f"| {key} | {new:.4f} | {'' if old is None else f'{old:.4f}'} | {change} |")
        if self.plots:
            lines += ["", "Plots (in this workflow run's artifacts): " + ", ".join(f"`{p.name}`" for p in self.plots)]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        """The report as JSON-able data (`flywheel report --json`)."""
        return {"run_id": self.run_id, "metrics": self.metrics, "champion": self.champion,
                "champion_metrics": self.champion_metrics, "candidate_version": self.candidate_version,
                "plots": [str(p) for p in self.plots]}


def report_run(settings: Settings, run_id: str, plots_dir: Path | None = None) -> RunReport:
    """The run's metrics next to the champion's, whether it became `candidate`, and its plots."""
    from mlflow.exceptions import MlflowException

    from flywheel.core.registry import Registry

    client = Registry(settings).client
    run = client.get_run(run_id)
    champion, champion_metrics = None, {}
    try:
        prod = client.get_model_version_by_alias(settings.model_name, "prod")
        champion = f"{settings.model_name} v{prod.version}"
        if prod.run_id:
            champion_metrics = dict(client.get_run(prod.run_id).data.metrics)
    except MlflowException:
        pass  # no champion yet
    candidate = None
    try:
        mv = client.get_model_version_by_alias(settings.model_name, "candidate")
        candidate = str(mv.version) if mv.run_id == run_id else None
    except MlflowException:
        pass  # nothing is candidate
    plots: list[Path] = []
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        for path in _png_artifacts(client, run_id):
            plots.append(Path(client.download_artifacts(run_id, path, str(plots_dir))))
    return RunReport(run_id=run_id, metrics=dict(run.data.metrics), champion=champion,
                     champion_metrics=champion_metrics, candidate_version=candidate, plots=tuple(plots))


def _png_artifacts(client, run_id: str, path: str = "", depth: int = 2) -> list[str]:
    found = []
    for info in client.list_artifacts(run_id, path or None):
        if info.is_dir and depth > 0:
            found += _png_artifacts(client, run_id, info.path, depth - 1)
        elif info.path.endswith(".png"):
            found.append(info.path)
    return found


def write_github_outputs(result: JobResult, report: RunReport | None,
                         environ: dict[str, str] | None = None) -> None:
    """Step outputs and the job summary, when running inside GitHub Actions (no-op elsewhere)."""
    env = os.environ if environ is None else environ
    if output := env.get("GITHUB_OUTPUT"):
        with open(output, "a") as fh:
            fh.write(f"run_id={result.run_id or ''}\nnode={result.node}\nexit_code={result.exit_code}\n"
                     f"candidate_version={(report.candidate_version if report else None) or ''}\n")
    if summary := env.get("GITHUB_STEP_SUMMARY"):
        with open(summary, "a") as fh:
            title = f"remote-train: commit `{result.commit[:12]}` on `{result.node}`"
            if report is not None:
                fh.write(report.markdown(title, f", exit code {result.exit_code}"))
            else:
                fh.write(f"### {title}\n\nExit code {result.exit_code}; MLflow run `{result.run_id or 'unknown'}`.\n")


def report_version(settings: Settings, version: str, plots_dir: Path | None = None, as_json: bool = False) -> str:
    """Markdown for a registry version (or alias) against the champion; appended to the CI job summary.
    With `as_json`, returns the same facts as one JSON document instead (the summary still gets Markdown)."""
    from flywheel.core.registry import Registry

    mv = Registry(settings).version(version)
    if not mv.run_id:
        raise FlywheelError(f"{settings.model_name} v{mv.version} has no source run to report on")
    report = report_run(settings, mv.run_id, plots_dir)
    text = report.markdown(f"{settings.model_name} v{mv.version}", f", aliases {', '.join(mv.aliases) or 'none'}")
    if summary := os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(summary, "a") as fh:
            fh.write(text)
    if as_json:
        return json.dumps({"model": settings.model_name, "version": str(mv.version), "aliases": list(mv.aliases),
                           **report.as_dict()}, indent=2)
    return text
