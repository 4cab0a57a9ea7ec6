"""Retrain triggers: GitHub repository_dispatch as documented, outbox retries, episodes and cooldown, SSH."""

from __future__ import annotations

import json
import time

import pytest

from flywheel.monitoring.triggers import (
    GitHubDispatch,
    LocalCommand,
    Outbox,
    PolicyConfig,
    RetrainEvent,
    SSHCommand,
    TriggerPolicy,
)


def _event(**kw) -> RetrainEvent:
    return RetrainEvent(model="fashion-classifier", reason="drift", version="3", dataset="fashion-mnist",
                        snapshot="/data/snapshots/fashion-classifier/v0002", snapshot_digest="ab" * 32,
                        details={"episode": "e1", "p_embedding": 1e-6}, **kw)


def test_github_dispatch_request_is_what_github_documents(github_api):
    action = GitHubDispatch("acme/flywheel", token="ghp_test123", api_url=github_api.url)
    receipt = action.fire(_event())
    assert "204" in receipt
    (req,) = github_api.requests
    assert req["path"] == "/repos/acme/flywheel/dispatches"
    assert req["headers"]["Accept"] == "application/vnd.github+json"
    assert req["headers"]["Authorization"] == "Bearer ghp_test123"
    assert req["headers"]["X-GitHub-Api-Version"] == "2022-11-28"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["json"]
    assert body["event_type"] == "retrain"
    payload = body["client_payload"]
    assert len(payload) <= 10  # GitHub caps client_payload at 10 top-level properties
    assert payload["model"] == "fashion-classifier" and payload["reason"] == "drift"
    assert payload["snapshot"].endswith("v0002") and payload["event_id"]


def test_failing_twice_then_succeeding_is_delivered_exactly_once(github_api, tmp_path):
    github_api.fail_first = 2
    action = GitHubDispatch("acme/flywheel", token="t", api_url=github_api.url)
    outbox = Outbox(tmp_path / "outbox", base_delay=10, max_delay=60)
    event = _event()
    outbox.enqueue(event, [action])
    outbox.enqueue(event, [action])  # the same event queued again (a retried tick) is not duplicated
    now = time.time()
    delivered = []
    for step in range(8):  # ticks 10 minutes apart: every backoff has elapsed by the next one
        # a fresh Outbox each tick: the retry state lives on disk, not in memory (monitor restarts)
        results = Outbox(tmp_path / "outbox", base_delay=10, max_delay=60).deliver([action], now=now + step * 600)
        delivered += [ok for _, ok in results]
    assert delivered == [False, False, True]
    assert github_api.answered == 3 and len(github_api.requests) == 1
    (sent,) = outbox.sent()
    assert sent.attempts == 3 and sent.event["event_id"] == event.event_id and not outbox.pending()
    outbox.enqueue(event, [action])  # already sent: never re-sent
    assert not outbox.pending()


def test_backoff_grows_and_entry_is_never_dropped(tmp_path):
    action = GitHubDispatch("acme/flywheel", token="t", api_url="http://127.0.0.1:9")  # nothing listens
    outbox = Outbox(tmp_path, base_delay=5, max_delay=40)
    outbox.enqueue(_event(), [action])
    delays, now = [], 1000.0
    for _ in range(6):
        (entry,) = outbox.pending()
        now = max(now, entry.next_attempt)
        ((d, ok),) = outbox.deliver([action], now=now)
        assert not ok and "GitHub dispatch" in d.last_error
        delays.append(d.next_attempt - now)
    assert delays[0] < delays[1] < delays[2] and max(delays) <= 40 * 1.2
    assert len(outbox.pending()) == 1 and outbox.pending()[0].attempts == 6


def test_policy_one_retrain_per_episode_and_cooldown(tmp_path):
    policy = TriggerPolicy(PolicyConfig(consecutive=3, clear_windows=2, cooldown_s=1000), tmp_path / "p.json")
    t = 0.0

    def feed(seq):
        nonlocal t
        out = []
        for drift in seq:
            t += 10
            out.append(policy.observe(drift, now=t))
        return out

    assert not any(d.fire for d in feed([False] * 20))  # clean traffic: nothing
    first = feed([True, True, True, True, True, False, True, True, True])  # one episode, a blip inside
    assert [d.fire for d in first].count(True) == 1 and first[2].fire and first[2].reason == "drift"
    again = feed([False, False] + [True] * 3)  # episode closed, a new one inside the cooldown
    assert not any(d.fire for d in again) and "cooldown" in again[-1].note
    t += 2000
    later = feed([False, False] + [True] * 3)  # after the cooldown a new episode fires
    assert [d.fire for d in later] == [False, False, False, False, True]
    # state survives a restart of the monitor
    assert TriggerPolicy(policy.config, tmp_path / "p.json").state.episodes == 3


def test_policy_schedule_and_labelled_data(tmp_path):
    policy = TriggerPolicy(PolicyConfig(schedule_s=100, min_labelled=50), tmp_path / "p.json")
    assert not policy.observe(False, labelled_total=10, now=0).fire
    d = policy.observe(False, labelled_total=60, now=10)
    assert d.fire and d.reason == "labelled-data"
    assert not policy.observe(False, labelled_total=70, now=20).fire
    d = policy.observe(False, labelled_total=70, now=120)
    assert d.fire and d.reason == "schedule"


def test_policy_accuracy_alarm_has_its_own_episodes(tmp_path):
    """K alarming labelled windows in a row fire one `accuracy` retrain; unlabelled windows (None) neither
    extend nor break the run; the cooldown is shared with drift; 0/None disables firing on it."""
    policy = TriggerPolicy(PolicyConfig(consecutive=3, accuracy_consecutive=2, clear_windows=2, cooldown_s=1000),
                           tmp_path / "p.json")
    t = 0.0

    def feed(alarms, drifts=None):
        nonlocal t
        out = []
        for a, d in zip(alarms, drifts or [False] * len(alarms), strict=True):
            t += 1
            out.append(policy.observe(d, now=t, accuracy_alarm=a))
        return out

    first = feed([True, None, None, True, True, True])
    assert [d.fire for d in first] == [False, False, False, True, False, False]
    assert first[3].reason == "accuracy" and "2 consecutive labelled windows" in first[3].note
    assert policy.state.accuracy_episode is not None and policy.state.episode is None
    feed([False, False])  # two clean labelled windows close the episode
    assert policy.state.accuracy_episode is None
    suppressed = feed([True, True])  # a new episode inside the cooldown: recorded, not fired
    assert not any(d.fire for d in suppressed) and "accuracy episode" in suppressed[-1].note \
        and "cooldown" in suppressed[-1].note
    t += 2000
    both = feed([False, False, None, True, True], [False, False, True, True, True])  # open together: one retrain
    assert [d.fire for d in both] == [False, False, False, False, True]
    assert both[4].reason == "drift" and "accuracy below the reference" in both[4].note
    assert TriggerPolicy(policy.config, tmp_path / "p.json").state.accuracy_episode == policy.state.accuracy_episode

    never = TriggerPolicy(PolicyConfig(accuracy_consecutive=None), tmp_path / "never.json")
    assert not any(never.observe(False, now=i, accuracy_alarm=True).fire for i in range(10))


def test_policy_state_of_an_older_flywheel_loads(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"consecutive": 2, "clean": 0, "episode": None, "episode_fired": False,
                                                 "last_fire": None, "last_schedule": 5.0, "labelled_at_last_fire": 0,
                                                 "episodes": 1, "suppressed": 0}))
    policy = TriggerPolicy(PolicyConfig(consecutive=3), tmp_path / "p.json")
    assert policy.observe(True, now=10).fire  # its drift run goes on where it was
    assert policy.state.accuracy_consecutive == 0


def test_accuracy_test_is_the_exact_one_sided_binomial():
    from scipy.stats import binom

    from flywheel.monitoring.accuracy import accuracy_test, reference_accuracy

    t = accuracy_test(42, 100, 0.6, 0.01)
    assert t.p_value == pytest.approx(binom.cdf(42, 100, 0.6)) and t.alarm and t.accuracy == 0.42
    assert not accuracy_test(58, 100, 0.6, 0.01).alarm  # within chance of the reference
    assert not accuracy_test(100, 100, 0.6, 0.01).alarm and accuracy_test(100, 100, 0.6, 0.01).p_value == 1.0
    assert accuracy_test(0, 0, 0.6, 0.01) is None and accuracy_test(5, 10, None, 0.01) is None
    # the level holds: under H0 (accuracy = reference) the alarm rate is at most alpha, for any n
    for n in (8, 30, 100):
        alarm_mass = sum(binom.pmf(k, n, 0.7) for k in range(n + 1) if accuracy_test(k, n, 0.7, 0.05).alarm)
        assert alarm_mass <= 0.05
    import numpy as np

    assert reference_accuracy({"test_accuracy": 0.81}, np.zeros(3), None) == (0.81, "run metric test_accuracy")
    assert reference_accuracy({}, np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]))[0] == 0.75
    assert reference_accuracy({}, np.array([1, 2]), None) == (None, "none")


def test_local_command_gets_payload(tmp_path):
    out = tmp_path / "payload.json"
    action = LocalCommand(f"sh -c 'printf %s \"$FLYWHEEL_RETRAIN_PAYLOAD\" > {out}; echo {{model}}'")
    action.fire(_event())
    assert json.loads(out.read_text())["model"] == "fashion-classifier"


@pytest.mark.integration
def test_ssh_trigger_through_real_sshd(ssh_node):
    action = SSHCommand(ssh_node.host, ssh_node.user, port=ssh_node.port, key_file=str(ssh_node.key_path),
                        known_hosts=str(ssh_node.known_hosts),
                        command=f"cat > {ssh_node.workdir}/retrain-{{event_id}}.json && echo queued {{model}}"
                                f" && echo $FLYWHEEL_EVENT_ID > {ssh_node.workdir}/event-env")
    event = _event()
    receipt = action.fire(event)
    assert "queued fashion-classifier" in receipt
    written = ssh_node.workdir / f"retrain-{event.event_id}.json"
    assert json.loads(written.read_text())["snapshot_digest"] == "ab" * 32
    # the event id reaches every part of the command's environment: the run is tagged with it (dedupe)
    assert (ssh_node.workdir / "event-env").read_text().strip() == event.event_id
    # a host whose key is not pinned is refused, and that is a retryable failure, not a crash
    from flywheel.monitoring.triggers import TriggerError

    bad_known = ssh_node.workdir.parent / "empty_known_hosts"
    bad_known.write_text("")
    with pytest.raises(TriggerError):
        SSHCommand(ssh_node.host, ssh_node.user, port=ssh_node.port, key_file=str(ssh_node.key_path),
                   known_hosts=str(bad_known), command="true").fire(event)
