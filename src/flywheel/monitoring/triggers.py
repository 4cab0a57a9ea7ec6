"""Retrain triggers: when to retrain (policy), how to ask for it (actions), and never losing the ask (outbox).

- `TriggerPolicy` turns per-window drift decisions into at most one retrain per drift episode:
  K consecutive drifting windows open an episode and fire once; the episode closes only after
  `clear_windows` clean windows in a row, and a new episode inside `cooldown_s` of the last fire is
  suppressed (recorded, not fired). The accuracy alarm (live accuracy on feedback labels below the
  version's reference accuracy, see flywheel.monitoring.service) has episodes of its own under the
  same rule (`accuracy_consecutive` alarming windows in a row open one, `clear_windows` windows
  without an alarm close it); a window whose predictions got no label has no accuracy verdict and
  neither extends nor breaks a run. Both kinds share the cooldown: one retrain answers both. A
  schedule and "enough new labelled data" are the other reasons.
- Actions: GitHub `repository_dispatch` (event `retrain`), SSH (a command on a training node, e.g.
  `flywheel remote-train` or `flywheel train`, run through paramiko with a pinned host key), or a local
  command.
- `Outbox`: every retrain request is a JSON file first and sent second. A failed send stays in the
  outbox with exponential backoff and is retried on every monitor tick until it succeeds; a sent entry
  moves to `sent/`, so one request is delivered exactly once by this node (the payload's `event_id`
  lets the receiver dedupe a retry whose success response was lost).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from flywheel.core.errors import FlywheelError
from flywheel.core.files import atomic_write_json
from flywheel.core.github import api_headers

GITHUB_API = "https://api.github.com"


class TriggerError(FlywheelError):
    """A retrain request could not be delivered (it stays in the outbox and is retried)."""


# ---------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class RetrainEvent:
    """What is asked for: retrain `model` because of `reason`, optionally with a dataset snapshot.

    `project`, `project_dir` and `commit` name where the version being replaced came from (its
    `flywheel.project`, `flywheel.project_dir` and `git_commit` lineage tags; "" when it records none),
    so the receiver trains THAT model from THAT project and commit."""

    model: str
    reason: str  # drift | accuracy | schedule | labelled-data | manual
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    env: str = "prod"
    version: str | None = None  # the served version whose traffic drifted
    dataset: str | None = None  # base dataset name for the retrain
    snapshot: str | None = None  # path/URI of the labelled-captures dataset snapshot
    snapshot_digest: str | None = None
    details: dict = field(default_factory=dict)  # p-values, window ids, counts
    created: float = field(default_factory=time.time)
    project: str = ""  # flywheel.project of the version being replaced: a local path or a git URL
    project_dir: str = ""  # the MLproject's directory inside that repository
    commit: str = ""  # git_commit of the version being replaced

    def client_payload(self) -> dict:
        """GitHub's client_payload: the 10 top-level keys a workflow reads (GitHub refuses more than 10),
        JSON-safe. `details` and `env` are in `payload()` (SSH, local) and the outbox's sent/ record."""
        return {"model": self.model, "reason": self.reason, "event_id": self.event_id,
                "version": self.version, "dataset": self.dataset, "snapshot": self.snapshot,
                "snapshot_digest": self.snapshot_digest, "project": self.project, "project_dir": self.project_dir,
                "commit": self.commit}

    def payload(self) -> dict:
        """The whole request (SSH stdin, $FLYWHEEL_RETRAIN_PAYLOAD): `client_payload()` plus `env`, `details`."""
        return {**self.client_payload(), "env": self.env, "details": self.details}

    @classmethod
    def from_dict(cls, data: dict) -> RetrainEvent:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Action(Protocol):
    name: str

    def fire(self, event: RetrainEvent) -> str:
        """Deliver the request; return a short receipt. Raise TriggerError on failure."""


# ---------------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class GitHubDispatch:
    """POST /repos/{owner}/{repo}/dispatches (GitHub REST API); GitHub answers 204 No Content."""

    repo: str  # owner/name
    token: str = field(repr=False)
    api_url: str = GITHUB_API  # configurable: GitHub Enterprise, or a local server in tests
    event_type: str = "retrain"
    timeout: float = 10.0
    name: str = "github"

    def __post_init__(self) -> None:
        if self.repo.count("/") != 1 or not all(self.repo.split("/")):
            raise FlywheelError(f"GitHub repository {self.repo!r} must be owner/name")
        if not self.token:
            raise FlywheelError("GitHub trigger needs a token: set GITHUB_TOKEN (repo scope or contents:write)")

    def fire(self, event: RetrainEvent) -> str:
        import requests

        url = f"{self.api_url.rstrip('/')}/repos/{self.repo}/dispatches"
        headers = api_headers(self.token)
        body = {"event_type": self.event_type, "client_payload": event.client_payload()}
        try:
            resp = requests.post(url, headers=headers, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise TriggerError(f"GitHub dispatch to {url} failed: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 204:
            raise TriggerError(f"GitHub dispatch to {url} answered HTTP {resp.status_code}: {resp.text[:200]}")
        return f"github {self.repo} dispatch {self.event_type} (204)"


@dataclass(frozen=True)
class SSHCommand:
    """Run a retrain command on a training node over SSH (paramiko, host key pinned in known_hosts).

    The command is a template: `{model}`, `{reason}`, `{event_id}`, `{env}`, `{version}`, `{dataset}`,
    `{snapshot}`, `{project}`, `{project_dir}`, `{commit}` are substituted shell-quoted (see
    `render_command`); the full payload is also sent on stdin as JSON.
    """

    host: str
    user: str
    command: str = "flywheel train --dataset {dataset}"
    port: int = 22
    key_file: str | None = None
    known_hosts: str | None = None
    timeout: float = 30.0
    name: str = "ssh"

    def fire(self, event: RetrainEvent) -> str:
        import paramiko

        # Exported first so every part of a compound command sees it: the run is tagged with the event,
        # which is how a retried delivery is recognised and skipped (flywheel.control.dispatches).
        cmd = f"export FLYWHEEL_EVENT_ID={shlex.quote(event.event_id)}; {render_command(self.command, event)}"
        client = paramiko.SSHClient()
        # Never trust an unknown host: the key must already be in known_hosts.
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            if self.known_hosts:
                client.load_host_keys(self.known_hosts)
            else:
                client.load_system_host_keys()
            client.connect(self.host, port=self.port, username=self.user, key_filename=self.key_file,
                           look_for_keys=False, allow_agent=False, timeout=self.timeout,
                           banner_timeout=self.timeout, auth_timeout=self.timeout)
            stdin, stdout, stderr = client.exec_command(cmd, timeout=self.timeout * 20)
            stdin.write(json.dumps(event.payload()))
            stdin.channel.shutdown_write()
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            code = stdout.channel.recv_exit_status()
        except (paramiko.SSHException, OSError) as exc:
            raise TriggerError(f"SSH trigger {self.user}@{self.host}:{self.port} failed: "
                               f"{type(exc).__name__}: {exc}") from None
        finally:
            client.close()
        if code != 0:
            raise TriggerError(f"SSH trigger command exited {code} on {self.host}: {err.strip()[-300:]}")
        return f"ssh {self.user}@{self.host}:{self.port} `{cmd}` ok: {out.strip()[-200:]}"


@dataclass(frozen=True)
class LocalCommand:
    """Run the retrain command on this machine; the payload is in $FLYWHEEL_RETRAIN_PAYLOAD, its event id
    in $FLYWHEEL_EVENT_ID (which `flywheel train` records on its run)."""

    command: str = "flywheel train --dataset {dataset}"
    timeout: float = 3600.0
    env: dict = field(default_factory=dict, repr=False)
    name: str = "local"

    def fire(self, event: RetrainEvent) -> str:
        argv = shlex.split(render_command(self.command, event))
        # FLYWHEEL_EVENT_ID: `flywheel train` tags its run with it, so a retried request can be deduped.
        env = {**os.environ, **self.env, "FLYWHEEL_RETRAIN_PAYLOAD": json.dumps(event.payload()),
               "FLYWHEEL_EVENT_ID": event.event_id}
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TriggerError(f"local trigger `{' '.join(argv)}` failed: {type(exc).__name__}: {exc}") from None
        if proc.returncode != 0:
            raise TriggerError(f"local trigger `{' '.join(argv)}` exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-300:]}")
        return f"local `{' '.join(argv)}` ok"


def render_command(template: str, event: RetrainEvent) -> str:
    values = {"model": event.model, "reason": event.reason, "event_id": event.event_id, "env": event.env,
              "version": event.version or "", "dataset": event.dataset or "fashion-mnist",
              "snapshot": event.snapshot or "", "project": event.project, "project_dir": event.project_dir or ".",
              "commit": event.commit}
    try:
        return template.format(**{k: shlex.quote(str(v)) for k, v in values.items()})
    except (KeyError, IndexError) as exc:
        raise FlywheelError(f"trigger command {template!r} uses unknown field {exc}; "
                            f"known: {', '.join(values)}") from None


# ---------------------------------------------------------------------------------------- outbox
@dataclass
class Delivery:
    """One outbox entry: an event for one action, with its retry bookkeeping."""

    event: dict
    action: str
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    delivered_at: float | None = None
    receipt: str | None = None

    @property
    def key(self) -> str:
        return f"{self.event['event_id']}-{self.action}"


class Outbox:
    """Persisted delivery queue: `pending/` until an action succeeds, then `sent/`."""

    def __init__(self, root: Path, base_delay: float = 5.0, max_delay: float = 900.0):
        self.root = Path(root)
        self.base_delay, self.max_delay = base_delay, max_delay

    def _pending(self, key: str) -> Path:
        return self.root / "pending" / f"{key}.json"

    def _sent(self, key: str) -> Path:
        return self.root / "sent" / f"{key}.json"

    def enqueue(self, event: RetrainEvent, actions: list[Action]) -> list[Delivery]:
        """Persist the event for each action (idempotent: an event id already queued or sent is kept)."""
        out = []
        for action in actions:
            d = Delivery(event=asdict(event), action=action.name)
            if not (self._pending(d.key).exists() or self._sent(d.key).exists()):
                atomic_write_json(self._pending(d.key), asdict(d))
            out.append(d)
        return out

    def pending(self) -> list[Delivery]:
        folder = self.root / "pending"
        if not folder.is_dir():
            return []
        items = []
        for path in sorted(folder.glob("*.json")):
            try:
                items.append(Delivery(**json.loads(path.read_text())))
            except (ValueError, TypeError) as exc:
                raise FlywheelError(f"outbox entry {path} is corrupt ({exc}); fix or move it aside") from None
        return sorted(items, key=lambda d: d.event.get("created", 0))

    def sent(self) -> list[Delivery]:
        folder = self.root / "sent"
        return [Delivery(**json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))] \
            if folder.is_dir() else []

    def deliver(self, actions: list[Action], now: float | None = None) -> list[tuple[Delivery, bool]]:
        """Try every due pending entry once. Returns (entry, delivered) for each attempt made."""
        by_name = {a.name: a for a in actions}
        results = []
        for d in self.pending():
            now_ = time.time() if now is None else now
            if d.next_attempt > now_ or d.action not in by_name:
                continue
            d.attempts += 1
            try:
                d.receipt = by_name[d.action].fire(RetrainEvent.from_dict(d.event))
            except Exception as exc:  # noqa: BLE001 - any failure is retried later, never lost
                d.last_error = f"{type(exc).__name__}: {exc}"
                # Exponential backoff with jitter, so a recovering endpoint is not hammered in lockstep.
                delay = min(self.max_delay, self.base_delay * 2 ** (d.attempts - 1))
                d.next_attempt = now_ + delay * random.uniform(0.8, 1.2)
                atomic_write_json(self._pending(d.key), asdict(d))
                results.append((d, False))
                continue
            d.delivered_at, d.last_error = time.time(), None
            # Write `sent` first, then drop `pending`: a crash in between re-sends nothing (enqueue and
            # deliver both check `sent`), it only leaves a stale pending file that is cleaned next tick.
            atomic_write_json(self._sent(d.key), asdict(d))
            self._pending(d.key).unlink(missing_ok=True)
            results.append((d, True))
        return results

    def clean(self) -> None:
        """Drop pending files whose event was already sent (see the crash note in `deliver`)."""
        for d in self.pending():
            if self._sent(d.key).exists():
                self._pending(d.key).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class PolicyConfig:
    consecutive: int = 3  # K drifting windows in a row open an episode
    clear_windows: int = 3  # this many clean windows in a row close it
    cooldown_s: float = 3600.0  # no second drift retrain within this time of the last one
    schedule_s: float | None = None  # retrain at least this often (None: never on schedule)
    min_labelled: int | None = None  # retrain once this many new labelled captures arrived
    accuracy_consecutive: int | None = 3  # K accuracy-alarm windows in a row open an episode (None: never fire)


@dataclass
class PolicyState:
    consecutive: int = 0
    clean: int = 0
    episode: str | None = None  # open drift episode id
    episode_fired: bool = False
    last_fire: float | None = None
    last_schedule: float | None = None
    labelled_at_last_fire: int = 0
    episodes: int = 0
    suppressed: int = 0
    # the accuracy alarm's run and episode (the drift fields' counterparts; absent in older state files)
    accuracy_consecutive: int = 0
    accuracy_clean: int = 0
    accuracy_episode: str | None = None
    accuracy_episode_fired: bool = False


@dataclass(frozen=True)
class Decision:
    fire: bool
    reason: str | None
    note: str
    episode: str | None


class TriggerPolicy:
    """Decides, window by window, whether to ask for a retrain. State is persisted as JSON."""

    def __init__(self, config: PolicyConfig, state_path: Path):
        self.config = config
        self.path = Path(state_path)
        self.state = self._load()

    def _load(self) -> PolicyState:
        if not self.path.is_file():
            return PolicyState()
        try:
            return PolicyState(**json.loads(self.path.read_text()))
        except (ValueError, TypeError) as exc:
            raise FlywheelError(f"trigger state {self.path} is corrupt ({exc}); delete it to start over") from None

    def save(self) -> None:
        atomic_write_json(self.path, asdict(self.state))

    def observe(self, drift: bool, labelled_total: int = 0, now: float | None = None,
                accuracy_alarm: bool | None = None) -> Decision:
        """Feed one window's drift decision and its accuracy verdict (True: alarm, False: labels came
        back and accuracy held, None: no label, no verdict); returns whether to fire and why."""
        now = time.time() if now is None else now
        s, c = self.state, self.config
        if s.last_schedule is None:
            s.last_schedule = now
        if drift:
            s.consecutive += 1
            s.clean = 0
        else:
            s.consecutive = 0
            s.clean += 1
            if s.episode is not None and s.clean >= c.clear_windows:
                s.episode, s.episode_fired = None, False
        if accuracy_alarm is True:
            s.accuracy_consecutive += 1
            s.accuracy_clean = 0
        elif accuracy_alarm is False:
            s.accuracy_consecutive = 0
            s.accuracy_clean += 1
            if s.accuracy_episode is not None and s.accuracy_clean >= c.clear_windows:
                s.accuracy_episode, s.accuracy_episode_fired = None, False
        decision = Decision(False, None, "no trigger", s.episode)
        if drift and s.episode is None and s.consecutive >= c.consecutive:
            s.episode, s.episode_fired = uuid.uuid4().hex[:12], False
            s.episodes += 1
        if (accuracy_alarm and c.accuracy_consecutive is not None and s.accuracy_episode is None
                and s.accuracy_consecutive >= c.accuracy_consecutive):
            s.accuracy_episode, s.accuracy_episode_fired = uuid.uuid4().hex[:12], False
            s.episodes += 1
        opened = []  # episodes that reach their one decision in this window: (reason, episode, note)
        if s.episode is not None and not s.episode_fired:
            s.episode_fired = True  # one episode → one decision, fired or suppressed
            opened.append(("drift", s.episode, f"drift in {s.consecutive} consecutive windows (episode {s.episode})"))
        if s.accuracy_episode is not None and not s.accuracy_episode_fired:
            s.accuracy_episode_fired = True
            opened.append(("accuracy", s.accuracy_episode, f"accuracy below the reference in "
                           f"{s.accuracy_consecutive} consecutive labelled windows (episode {s.accuracy_episode})"))
        if opened:
            reason, episode, note = opened[0] if len(opened) == 1 else \
                ("drift", opened[0][1], f"{opened[0][2]}; {opened[1][2]}")  # both at once: one retrain
            if s.last_fire is not None and now - s.last_fire < c.cooldown_s:
                s.suppressed += 1
                decision = Decision(False, None, f"{reason} episode {episode} suppressed: cooldown "
                                    f"({now - s.last_fire:.0f}s < {c.cooldown_s:.0f}s since last retrain)",
                                    episode)
            else:
                decision = Decision(True, reason, note, episode)
        elif c.min_labelled is not None and labelled_total - s.labelled_at_last_fire >= c.min_labelled:
            decision = Decision(True, "labelled-data", f"{labelled_total - s.labelled_at_last_fire} new "
                                f"labelled captures >= {c.min_labelled}", s.episode)
        elif c.schedule_s is not None and now - s.last_schedule >= c.schedule_s:
            decision = Decision(True, "schedule", f"schedule: {now - s.last_schedule:.0f}s since last retrain",
                                s.episode)
        if decision.fire:
            s.last_fire = now
            s.last_schedule = now
            s.labelled_at_last_fire = labelled_total
        self.save()
        return decision


def build_actions(github_repo: str | None = None, github_token: str | None = None, github_api: str = GITHUB_API,
                  ssh_node: str | None = None, ssh_command: str | None = None, ssh_key: str | None = None,
                  known_hosts: str | None = None, local_command: str | None = None) -> list[Action]:
    """Actions from CLI options; each kind is enabled by its own option."""
    actions: list[Action] = []
    if github_repo:
        actions.append(GitHubDispatch(github_repo, github_token or "", api_url=github_api))
    if ssh_node:
        user, _, hostport = ssh_node.rpartition("@")
        host, _, port = hostport.partition(":")
        if not user or not host or (port and not port.isdigit()):
            raise FlywheelError(f"--ssh-node {ssh_node!r} must be user@host[:port]")
        actions.append(SSHCommand(host, user, command=ssh_command or SSHCommand.command, port=int(port or 22),
                                  key_file=ssh_key, known_hosts=known_hosts))
    if local_command:
        actions.append(LocalCommand(local_command))
    return actions
