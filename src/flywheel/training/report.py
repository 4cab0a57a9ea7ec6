"""A pull request's training report: its run against the champion, as Markdown + PNG files.

`flywheel report --run ID` (or `--commit REF`: the newest finished run of that commit) renders what a
reviewer needs to judge a change to training code or data, from the real MLflow runs:

* the metrics of the run next to the champion's (the version `Registry.champion` names: `prod`, else
  the best registered one), each with its delta;
* the gate's decision, computed by the gate's own comparison (`Registry.compare`: both models on the
  run's labelled test set, in the component's gate metric, with `margin`), which registers, aliases
  and records nothing: a report never moves an alias;
* per-class recall (the class's accuracy) and F1 of both models on those same images, with deltas;
* the run's confusion matrix and both runs' loss/accuracy curves (`MlflowClient.get_metric_history`)
  as PNG files;
* the data each side trained on (the runs' `dataset` / `dataset_digest` tags) and its commit;
* links to both runs (and the champion's version) in the MLflow UI.

`write` puts `report.md` (images embedded by relative path, for the workflow artifact or a local
look), `comment.md` (the pull request comment: it starts with `marker(model)`, the hidden line the
workflow finds its own comment by, and names the images instead of embedding them, because a PR
comment cannot carry files; docs/github.md) and `report.json` into one folder.
`flywheel.training.dispatch.report` is the other report: a version's logged metrics for a CI job summary.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from flywheel.core.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.core.config import Settings
    from flywheel.core.registry import GateDecision

CONFUSION_PNG = "confusion_matrix.png"
CHAMPION_CONFUSION_PNG = "champion_confusion_matrix.png"
CURVES_PNG = "loss_curves.png"
CURVE_METRICS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")  # flywheel.component.loop's per-epoch keys
LOWER_IS_BETTER = ("loss", "seconds")  # a metric whose name contains one of these improves downwards
NEUTRAL = ("lr",)  # a setting logged as a metric: neither better nor worse
COMMENT_CLASSES = 30  # a PR comment lists the classes that changed most (GitHub caps a comment at 65536 chars)
SKIP_PREFIXES = ("system/",)  # MLflow's system metrics: the machine, not the model


def marker(model_name: str) -> str:
    """The hidden first line of a model's PR comment: the workflow updates the comment that has it."""
    return f"<!-- flywheel-report model={model_name} -->"


@dataclass(frozen=True)
class Side:
    """One run of the comparison: the pull request's, or the champion's source run."""

    run_id: str
    experiment_id: str
    metrics: dict[str, float]
    tags: dict[str, str]
    version: str | None = None  # the champion's registry version
    url: str | None = None  # the run in the MLflow UI

    @property
    def dataset(self) -> str:
        return self.tags.get("dataset", "")

    @property
    def dataset_digest(self) -> str:
        return self.tags.get("dataset_digest", "")

    @property
    def commit(self) -> str:
        return self.tags.get("git_commit", "")


@dataclass(frozen=True)
class ClassRow:
    name: str
    support: int
    recall: float  # the class's accuracy
    f1: float
    champion_recall: float | None
    champion_f1: float | None


@dataclass(frozen=True)
class PullRequestReport:
    model_name: str
    run: Side
    champion: Side | None
    decision: GateDecision
    n_test: int
    classes: tuple[ClassRow, ...]
    tracking_url: str | None
    version_url: str | None = None  # the champion version in the MLflow UI
    images: tuple[Path, ...] = field(default=(), repr=False)

    # -- rendering ---------------------------------------------------------------------------------
    def metric_rows(self) -> list[tuple[str, float | None, float | None, float | None]]:
        """(metric, this run, champion, delta) for every model metric either run logged; the gate
        metric on the test set first."""
        champ = self.champion.metrics if self.champion else {}
        keys = {k for k in (*self.run.metrics, *champ) if not k.startswith(SKIP_PREFIXES)}
        first = f"test_{self.decision.metric}"
        order = sorted(keys, key=lambda k: (k != first, not k.startswith("test_"), not k.startswith("val_"), k))
        rows = []
        for key in order:
            new, old = self.run.metrics.get(key), champ.get(key)
            rows.append((key, new, old, None if new is None or old is None else new - old))
        return rows

    def verdict(self) -> str:
        d = self.decision
        if d.champion_version is None:
            return f"**would register** this run as `candidate`: {self.model_name} has no champion yet"
        verb = "**would register**" if d.accepted else "**would not register**"
        how = "beats" if d.accepted else "does not beat"
        return f"{verb} this run as `candidate`: it {how} champion v{d.champion_version} in {d.metric} (margin {d.margin:g})"

    def markdown(self, embed_images: bool = True) -> str:
        d, run, champ = self.decision, self.run, self.champion
        champ_name = f"champion v{champ.version}" if champ else "champion (none)"
        lines = [f"### Flywheel: {self.model_name}, this change's run vs the champion", "",
                 f"Run {_link(f'`{run.run_id}`', run.url)}"
                 + (f" vs {_link(f'{self.model_name} v{champ.version}', self.version_url)} "
                    + (f"(run {_link(f'`{champ.run_id}`', champ.url)})" if champ.run_id else "(no source run)")
                    if champ else f": no champion of {self.model_name}")
                 + ".", "",
                 "#### Gate", "",
                 f"| | this run | {champ_name} | Δ |", "|---|---:|---:|---:|",
                 f"| {d.metric} on this run's test set (n={self.n_test}) | {d.challenger_accuracy:.4f} | "
                 f"{_num(d.champion_accuracy)} | {_delta(d.challenger_accuracy, d.champion_accuracy)} |", "",
                 f"The gate {self.verdict()}. Nothing was registered: a report never moves an alias.", ""]
        if recorded := run.tags.get("gate.decision"):
            lines += [f"The run's own gate recorded `{recorded}` "
                      f"(against v{run.tags.get('gate.champion_version', '?')}, margin {run.tags.get('gate.margin', '?')}).",
                      ""]
        lines += ["#### Metrics", "", f"| metric | this run | {champ_name} | Δ |", "|---|---:|---:|---:|"]
        for key, new, old, delta in self.metric_rows():
            lines.append(f"| {key} | {_num(new)} | {_num(old)} | {_signed(delta, key)} |")
        lines += ["", "#### Per class (this run's test set)", "",
                  f"| class | n | recall | {champ_name} | Δ recall | F1 | {champ_name} | Δ F1 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        classes = self.classes
        if not embed_images and len(classes) > COMMENT_CLASSES:  # the comment: the largest changes only
            classes = tuple(sorted(classes, key=lambda c: -abs(c.f1 - (c.champion_f1 if c.champion_f1 is not None
                                                                         else c.f1)))[:COMMENT_CLASSES])
        for c in classes:
            lines.append(f"| {c.name} | {c.support} | {c.recall:.4f} | {_num(c.champion_recall)} | "
                         f"{_delta(c.recall, c.champion_recall)} | {c.f1:.4f} | {_num(c.champion_f1)} | "
                         f"{_delta(c.f1, c.champion_f1)} |")
        if len(classes) < len(self.classes):
            lines += ["", f"The {len(classes)} classes whose F1 changed most of {len(self.classes)}; all are in "
                          "`report.md`."]
        lines += ["", "#### Data and code", "", f"| | this run | {champ_name} | |", "|---|---|---|---|"]
        for label, new, old in (("dataset", run.dataset, champ.dataset if champ else None),
                                ("dataset digest", run.dataset_digest, champ.dataset_digest if champ else None),
                                ("git commit", run.commit, champ.commit if champ else None)):
            change = "" if old is None else ("unchanged" if new == old else "**changed**")
            lines.append(f"| {label} | {_code(new)} | {'' if old is None else _code(old)} | {change} |")
        lines.append("")
        names = [p.name for p in self.images]
        if names and embed_images:
            lines += ["#### Plots", ""] + [f"![{Path(n).stem.replace('_', ' ')}]({n})" for n in names] + [""]
        elif names:
            lines += ["#### Plots", "", "The confusion matrix and loss curves (" + ", ".join(f"`{n}`" for n in names)
                      + ") are in this workflow run's `flywheel-report` artifact"
                      + (f"; the run's own plots are in {_link('its MLflow artifacts', run.url + '/artifacts')}"
                         if run.url else "") + ".", ""]
        if not self.tracking_url:
            lines += [f"Runs are in the MLflow store this report read (`runs:/{run.run_id}`); pass --mlflow-url "
                      "for links.", ""]
        return "\n".join(lines)

    def comment(self) -> str:
        """The pull request comment: the marker line, then the report naming its images."""
        return f"{marker(self.model_name)}\n{self.markdown(embed_images=False)}"

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {"model": self.model_name, "run": asdict(self.run),
                "champion": None if self.champion is None else asdict(self.champion),
                "gate": asdict(self.decision), "n_test": self.n_test,
                "metrics": [{"metric": k, "run": a, "champion": b, "delta": c} for k, a, b, c in self.metric_rows()],
                "classes": [asdict(c) for c in self.classes], "tracking_url": self.tracking_url,
                "version_url": self.version_url, "images": [p.name for p in self.images]}

    def write(self, out: Path) -> list[Path]:
        """report.md, comment.md and report.json into `out` (the images are there already)."""
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "report.md", out / "comment.md", out / "report.json"]
        files[0].write_text(self.markdown(embed_images=True))
        files[1].write_text(self.comment())
        files[2].write_text(json.dumps(self.as_dict(), indent=2))
        return files


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _delta(new: float | None, old: float | None) -> str:
    return "" if new is None or old is None else f"{new - old:+.4f}"


def _signed(delta: float | None, key: str) -> str:
    """A delta with an arrow that says better (▲ up is good for accuracy, down for loss) or worse."""
    if delta is None:
        return ""
    if delta == 0 or key in NEUTRAL:
        return f"{delta:+.4f}"
    better = (delta < 0) if any(w in key for w in LOWER_IS_BETTER) else (delta > 0)
    return f"{delta:+.4f} {'✅' if better else '🔻'}"


def _code(value: str) -> str:
    """A tag value in a table cell: digests and commits shortened to 12 characters; '?' when unrecorded."""
    return f"`{value[:12]}`" if value else "?"


def _link(text: str, url: str | None) -> str:
    return f"[{text}]({url})" if url else text


# -- building --------------------------------------------------------------------------------------
def mlflow_url(settings: Settings, given: str | None = None) -> str | None:
    """The MLflow UI's base URL: `given`, else the tracking URI when it is a web server."""
    url = given or (settings.tracking_uri if settings.tracking_uri.startswith(("http://", "https://")) else None)
    return url.rstrip("/") if url else None


def find_run(settings: Settings, ref: str, cwd: Path | None = None) -> str:
    """Id of the newest finished run of commit `ref` (a SHA or a prefix of one; a branch, tag or
    `HEAD` when `cwd` is a git checkout that knows it), by the runs' `git_commit` tag."""
    from flywheel.core.registry import Registry

    sha = _rev_parse(ref, cwd or Path.cwd())
    if sha is None and not (len(ref) >= 7 and all(ch in "0123456789abcdef" for ch in ref.lower())):
        raise FlywheelError(f"{ref!r} is not a commit here: give a commit SHA (7+ hex digits) or run in the git "
                            "checkout that has the ref")
    clause = f"tags.git_commit = '{sha}'" if sha else f"tags.git_commit LIKE '{ref.lower()}%'"
    client = Registry(settings).client
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"{clause} and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not runs:
        raise FlywheelError(f"no finished MLflow run of commit {sha or ref} at {settings.tracking_uri}: train it "
                            "first (`flywheel remote-train --commit ...`), or pass its run with --run")
    return runs[0].info.run_id


def _rev_parse(ref: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=cwd,
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None  # no git here: the ref must be a SHA (prefix)
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def build_report(settings: Settings, run_id: str, *, margin: float = 0.0, out: Path | None = None,
                 tracking_url: str | None = None) -> PullRequestReport:
    """The report of run `run_id` against `settings.model_name`'s champion; with `out`, its PNG
    files are drawn there (`PullRequestReport.write` adds the text files)."""
    from flywheel.core.registry import Registry

    registry = Registry(settings)
    run = registry.existing_run(run_id)
    base = mlflow_url(settings, tracking_url)
    compared = registry.compare(run_id, margin=margin)
    challenger, champ_eval = compared.challenger, compared.champion
    this = _side(run, base)
    champion, version_url, version = None, None, compared.decision.champion_version
    if version is not None:
        champion = (_side(registry.run(compared.champion_run_id), base, version) if compared.champion_run_id
                    else Side("", "", {}, {}, version))  # a version registered without a source run
        if base:
            version_url = f"{base}/#/models/{quote(settings.model_name, safe='')}/versions/{version}"
    classes = tuple(
        ClassRow(name, int(m["support"]), float(m["recall"]), float(m["f1"]),
                 None if champ_eval is None else float(champ_eval.per_class[name]["recall"]),
                 None if champ_eval is None else float(champ_eval.per_class[name]["f1"]))
        for name, m in challenger.per_class.items())
    images: tuple[Path, ...] = ()
    if out is not None:
        images = draw_images(registry.client, this, champion, challenger, champ_eval, out)
    return PullRequestReport(settings.model_name, this, champion, compared.decision, challenger.n, classes, base,
                             version_url, images)


def _side(run, base: str | None, version: str | None = None) -> Side:
    exp, rid = run.info.experiment_id, run.info.run_id
    return Side(rid, exp, dict(run.data.metrics), dict(run.data.tags), version,
                f"{base}/#/experiments/{exp}/runs/{rid}" if base else None)


def draw_images(client, run: Side, champion: Side | None, challenger, champ_eval, out: Path) -> tuple[Path, ...]:
    """The run's (and the champion's) confusion matrix on the run's test set, and both runs' curves."""
    from flywheel.core.plots import confusion_matrix_png

    out.mkdir(parents=True, exist_ok=True)
    images = [confusion_matrix_png(challenger.confusion, challenger.class_names, out / CONFUSION_PNG)]
    if champ_eval is not None:
        images.append(confusion_matrix_png(champ_eval.confusion, champ_eval.class_names, out / CHAMPION_CONFUSION_PNG))
    histories = {"this run": _history(client, run.run_id)}
    if champion is not None and champion.run_id:
        histories[f"champion v{champion.version}"] = _history(client, champion.run_id)
    images.append(curves_png(histories, out / CURVES_PNG))
    return tuple(images)


def _history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per curve metric, in step order (a retried log may repeat a step: the last wins)."""
    found = {}
    for key in CURVE_METRICS:
        by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
        found[key] = sorted(by_step.items())
    return found


def curves_png(histories: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path:
    """Loss and accuracy per epoch, one line style per run (solid: the first, dashed: the next)."""
    from flywheel.core.plots import figure

    fig = figure((10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for (label, history), style in zip(histories.items(), ("-", "--"), strict=False):
        for ax, kind in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
                points = history.get(f"{split}_{kind}", [])
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot([s + 1 for s in steps], values, style, marker="o", color=color, label=f"{label} {split}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def render(settings: Settings, *, run_id: str | None = None, commit: str | None = None, margin: float = 0.0,
           out: Path | None = None, tracking_url: str | None = None) -> PullRequestReport:
    """`flywheel report --run/--commit`: build the report (and, with `out`, write every file there)."""
    if (run_id is None) == (commit is None):
        raise FlywheelError("name the run to report on with exactly one of --run, --commit or --version")
    run_id = run_id or find_run(settings, commit or "")
    report = build_report(settings, run_id, margin=margin, out=out, tracking_url=tracking_url)
    if out is not None:
        report.write(out)
    return report
