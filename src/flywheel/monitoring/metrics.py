"""The monitor's Prometheus metrics: one registry per monitor process, every series labelled by
`model` and `env` (and `version` for the per-version families), so one /metrics endpoint serves every
model a `MonitorGroup` watches. Kept apart from `service.py`, which fills them after each tick (`group.py` serves them)."""

from __future__ import annotations


class Metrics:
    """Prometheus metrics in the monitor's own registry (no global state). Every series carries the
    `model` and `env` labels; `bound(model, env)` gives another monitor the same registry under its
    own labels (one /metrics endpoint for several models). The `flywheel_drift_*`, `flywheel_live_*`
    and `flywheel_accuracy_*` families are the alias's version's (what alerts watch); the
    `flywheel_version_*` families repeat them for every version windowed, with a `version` label
    (the canary's next to the current one's)."""

    def __init__(self, model: str, env: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        labels = ["model", "env"]
        self.labels = {"model": model, "env": env}
        r = self.registry
        self.up = Gauge("flywheel_monitor_up", "1 when the model's latest monitor tick succeeded, 0 when it failed",
                        labels, registry=r)
        self.errors = Counter("flywheel_monitor_errors", "monitor ticks that failed (no alias, no reference, "
                              "store or tracking errors)", labels, registry=r)
        self.p_value = Gauge("flywheel_drift_p_value", "p-value of the latest window's drift test", labels + ["test"],
                             registry=r)
        self.detected = Gauge("flywheel_drift_detected", "1 when the latest window drifted", labels, registry=r)
        self.window_size = Gauge("flywheel_drift_window_size", "samples per drift window", labels, registry=r)
        self.lag = Gauge("flywheel_capture_lag_seconds", "age of the newest capture processed", labels, registry=r)
        self.dropped = Gauge("flywheel_capture_dropped", "captures dropped by serving writers (as they report)",
                             labels, registry=r)
        self.windows = Counter("flywheel_drift_windows", "windows tested", labels, registry=r)
        self.drifted = Counter("flywheel_drift_windows_drifted", "windows that drifted", labels, registry=r)
        self.triggers = Counter("flywheel_retrain_triggers", "retrain requests queued", labels + ["reason"],
                                registry=r)
        self.outbox = Gauge("flywheel_trigger_outbox_pending", "retrain requests not yet delivered", labels,
                            registry=r)
        self.accuracy = Gauge("flywheel_live_accuracy", "accuracy on windows with feedback labels", labels,
                              registry=r)
        self.accuracy_p = Gauge("flywheel_accuracy_p_value", "p-value of the latest labelled window's accuracy test "
                                "(exact one-sided binomial against the reference accuracy)", labels, registry=r)
        self.accuracy_alarm = Gauge("flywheel_accuracy_alarm", "1 when the latest labelled window's accuracy is "
                                    "significantly below the version's reference accuracy", labels, registry=r)
        self.reference_accuracy = Gauge("flywheel_reference_accuracy", "the version's reference accuracy (its "
                                        "training run's test_accuracy)", labels, registry=r)
        self.accuracy_alarms = Counter("flywheel_accuracy_windows_alarmed", "labelled windows whose accuracy alarmed",
                                       labels, registry=r)
        self.class_fraction = Gauge("flywheel_prediction_class_fraction", "share of the latest window per class",
                                    labels + ["class_index"], registry=r)
        self.version = Gauge("flywheel_monitored_version", "model version behind the alias", labels, registry=r)
        # Counted after each commit: summed over `kind` it equals the records stored (exactly-once reading).
        self.read = Counter("flywheel_captures_read", "captured records read, by what happened to them", labels
                            + ["kind"], registry=r)
        self.pending = Gauge("flywheel_captures_pending", "monitored records waiting for a full window", labels,
                             registry=r)
        by_version = labels + ["version"]
        self.v_p_value = Gauge("flywheel_version_drift_p_value", "p-value of the version's latest window's drift test",
                               by_version + ["test"], registry=r)
        self.v_detected = Gauge("flywheel_version_drift_detected", "1 when the version's latest window drifted",
                                by_version, registry=r)
        self.v_windows = Counter("flywheel_version_windows", "windows tested, per version", by_version, registry=r)
        self.v_drifted = Counter("flywheel_version_windows_drifted", "windows that drifted, per version", by_version,
                                 registry=r)
        self.v_accuracy = Gauge("flywheel_version_live_accuracy", "the version's accuracy on its latest labelled "
                                "window", by_version, registry=r)
        self.v_accuracy_p = Gauge("flywheel_version_accuracy_p_value", "p-value of the version's latest labelled "
                                  "window's accuracy test", by_version, registry=r)
        self.v_accuracy_alarm = Gauge("flywheel_version_accuracy_alarm", "1 when the version's latest labelled "
                                      "window's accuracy is significantly below its reference", by_version, registry=r)
        self.v_accuracy_alarms = Counter("flywheel_version_accuracy_windows_alarmed", "labelled windows whose "
                                         "accuracy alarmed, per version", by_version, registry=r)
        self.v_pending = Gauge("flywheel_version_captures_pending", "records waiting for a full window, per version",
                               by_version, registry=r)

    def bound(self, model: str, env: str) -> Metrics:
        """These metric families (same registry) under another model's labels."""
        import copy

        other = copy.copy(self)
        other.labels = {"model": model, "env": env}
        return other

    def serve(self, port: int, addr: str):
        from prometheus_client import start_http_server

        return start_http_server(port, addr=addr, registry=self.registry)
