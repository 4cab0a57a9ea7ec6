"""Capture writer and store: batching off the request path, bounded queue, failures counted not raised."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from flywheel.contracts.capture import (
    CaptureWriter,
    StoreError,
    iter_captures,
    list_batches,
    open_store,
    read_feedback,
    read_writer_stats,
    write_feedback,
)
from flywheel.contracts.preprocessing import decode_image, encode_png


def _record(i: int, model: str = "fashion-classifier") -> dict:
    img = (np.arange(28 * 28).reshape(28, 28) * (i + 1) % 256).astype(np.uint8)
    return {"prediction_id": f"p{i}", "model": model, "version": "3", "ts": time.time(),
            "image_png": encode_png(img), "embedding": np.full(16, i, np.float32), "label": "Bag",
            "label_index": 8, "confidence": 0.9, "probs": [0.1] * 10}


def test_roundtrip_batches_and_cursor(tmp_path):
    writer = CaptureWriter(str(tmp_path), flush_every=10, flush_seconds=0.2)
    for i in range(25):
        assert writer.submit(_record(i))
    writer.close()
    assert writer.stats()["written"] == 25 and writer.dropped == 0
    caps = list(iter_captures(str(tmp_path), "fashion-classifier"))
    assert [c.prediction_id for c in caps] == [f"p{i}" for i in range(25)]
    assert caps[3].embedding.dtype == np.float32 and caps[3].embedding[0] == 3
    assert decode_image(caps[3].image_png).shape == (28, 28)
    batches = list_batches(str(tmp_path), "fashion-classifier")
    assert len(batches) >= 3  # flush_every=10 → batched, not one object per request
    after = list(iter_captures(str(tmp_path), "fashion-classifier", since=batches[0]))
    assert len(after) == 25 - sum(c.batch == batches[0] for c in caps)
    assert read_writer_stats(str(tmp_path), "fashion-classifier")[0]["written"] == 25


def test_sampling_and_full_queue_never_block(tmp_path):
    sampled = CaptureWriter(str(tmp_path / "s"), sample_rate=0.0)
    assert not sampled.submit(_record(0)) and sampled.sampled_out == 1 and sampled.dropped == 0

    class HungStore:  # a store whose writes hang until released: the queue must absorb, then drop
        uri = "hung"

        def __init__(self):
            self.entered, self.release = threading.Event(), threading.Event()

        def put(self, name, data):
            self.entered.set()
            self.release.wait(60)

    writer = CaptureWriter(str(tmp_path / "q"), max_queue=8, flush_every=1)
    writer.store = store = HungStore()
    assert writer.submit(_record(0)) and store.entered.wait(30)  # the writer is stuck in its first put
    accepted = sum(writer.submit(_record(i)) for i in range(1, 200))
    # Every submit returned while that put still hangs: none of them waited for the store.
    assert not store.release.is_set() and writer.written == 0
    assert accepted <= 10 and writer.dropped >= 189
    store.release.set()
    writer.close()


def test_a_record_builder_runs_only_for_a_kept_record(tmp_path):
    """The serving handlers pass a function that encodes the image: a sampled-out request, or one
    met by a closed writer, never pays for it; one that fails is counted, never raised."""
    built = []

    def builder(i):
        return lambda: built.append(i) or _record(i)

    sampled = CaptureWriter(str(tmp_path / "s"), sample_rate=0.0)
    assert not sampled.submit(builder(0)) and sampled.sampled_out == 1 and built == []

    writer = CaptureWriter(str(tmp_path / "k"), flush_every=5, flush_seconds=0.1)
    assert all(writer.submit(builder(i)) for i in (1, 2, 3))

    def broken():
        raise ValueError("cannot encode this image")

    assert not writer.submit(broken) and writer.dropped == 1 and "cannot encode" in writer.last_error
    writer.close()
    assert not writer.submit(builder(4)) and writer.dropped == 2
    assert built == [1, 2, 3]
    assert [c.prediction_id for c in iter_captures(str(tmp_path / "k"), "fashion-classifier")] == ["p1", "p2", "p3"]


def test_unwritable_store_counts_drops(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    writer = CaptureWriter(str(blocker / "captures"), flush_every=5, flush_seconds=0.1)
    for i in range(12):
        writer.submit(_record(i))
    assert writer.flush(10)
    assert writer.dropped == 12 and writer.written == 0 and writer.errors >= 1
    assert "NotADirectory" in (writer.last_error or "")


def test_the_servers_environment_wins_over_the_packaged_capture_config(tmp_path, monkeypatch):
    """Both engines build their writer from the model's config (model-config.yaml / config.pbtxt, values
    as strings there) with FLYWHEEL_CAPTURE_* on the server winning; a bad value is a clear error."""
    from flywheel.contracts.capture import STORE_TIMEOUT_S, writer_from_config

    for name in ("FLYWHEEL_CAPTURE_URI", "FLYWHEEL_CAPTURE_SAMPLE", "FLYWHEEL_CAPTURE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    assert writer_from_config({}) is None  # capture off
    packaged = {"capture_uri": "gs://packaged/caps", "capture_sample": "0.0", "capture_timeout": "12"}
    w = writer_from_config(packaged)
    assert (w.store.uri, w.sample_rate, w.store.timeout) == ("gs://packaged/caps", 0.0, 12.0)
    assert writer_from_config({"capture_uri": "gs://b/p"}).store.timeout == STORE_TIMEOUT_S
    monkeypatch.setenv("FLYWHEEL_CAPTURE_URI", str(tmp_path / "caps"))
    monkeypatch.setenv("FLYWHEEL_CAPTURE_SAMPLE", "0.5")
    monkeypatch.setenv("FLYWHEEL_CAPTURE_TIMEOUT", "600")
    w = writer_from_config(packaged)
    assert (w.uri, w.sample_rate) == (str(tmp_path / "caps"), 0.5)
    monkeypatch.setenv("FLYWHEEL_CAPTURE_URI", "gs://served/caps")
    assert writer_from_config(packaged).store.timeout == 600.0
    monkeypatch.setenv("FLYWHEEL_CAPTURE_TIMEOUT", "0")
    with pytest.raises(ValueError, match="store_timeout must be > 0"):
        writer_from_config(packaged)


def test_feedback_roundtrip(tmp_path):
    write_feedback(str(tmp_path), "m", {"p1": "Bag", "p2": "Coat"})
    write_feedback(str(tmp_path), "m", [("p1", "Sandal")])  # a later correction wins
    assert read_feedback(str(tmp_path), "m") == {"p1": "Sandal", "p2": "Coat"}
    with pytest.raises(ValueError):
        write_feedback(str(tmp_path), "m", [])


@pytest.mark.integration
def test_gcs_store_through_emulator(gcs_env):
    uri = f"gs://{gcs_env.bucket}/captures"
    writer = CaptureWriter(uri, flush_every=8, flush_seconds=0.2)
    for i in range(20):
        writer.submit(_record(i))
    writer.close()
    assert writer.written == 20, writer.last_error
    caps = list(iter_captures(uri, "fashion-classifier"))
    assert len(caps) == 20 and decode_image(caps[0].image_png).shape == (28, 28)
    first = caps[0].batch
    assert len(list(iter_captures(uri, "fashion-classifier", since=first))) == 20 - sum(c.batch == first for c in caps)


@pytest.mark.integration
def test_gcs_store_unreachable_drops_fast(monkeypatch):
    # A store that accepts connections and never answers: an upload hangs for the store timeout (5 s).
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{silent.getsockname()[1]}")
    writer = CaptureWriter("gs://nowhere/captures", flush_every=4, flush_seconds=0.1)
    try:
        for i in range(40):
            writer.submit(_record(i))
        # All 40 returned before any upload gave up: no submit waited for the store.
        assert writer.errors == 0 and writer.written == 0
    finally:
        silent.close()  # the hung connections are reset, the rest refused: each upload fails at once
    assert writer.flush(30)
    assert writer.dropped == 40 and writer.written == 0 and writer.errors >= 1


def test_a_store_that_cannot_be_used_is_one_line_that_says_what_to_set(no_google_credentials):
    for uri, says in (("s3://b/p", "only local directories and gs://bucket/prefix"), ("gs:///p", "names no bucket"),
                      ("", "is empty")):
        with pytest.raises(StoreError, match=says):
            open_store(uri)
    with pytest.raises(StoreError, match=r"^gs://b/p: no Google credentials found; set GOOGLE_APPLICATION_CREDENTIALS"
                                         r" .* or STORAGE_EMULATOR_HOST for a GCS emulator$"):
        list_batches("gs://b/p", "fashion-classifier")


def test_answers_of_a_batch_equal_one_answer_per_image():
    """The serving engines build a batch's answers at once (`answers`); each is the dict `answer` gives
    for that image alone (ties, per-row top_k, float32 probabilities), but for its fresh id."""
    import json

    from flywheel.contracts.capture import answer, answers

    names = [f"class {i}" for i in range(10)]
    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(1, 17))
        logits = rng.standard_normal((n, 10)).astype(np.float32)
        if trial % 3 == 0:
            logits[:, :5] = logits[:, :1]  # ties: the same order as a single image's sort
        probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
        ks = rng.integers(1, 11, n).tolist()
        batch = answers("m", "3", names, probs, ks if trial % 2 else ks[0])
        for i, got in enumerate(batch):
            want = answer("m", "3", names, probs[i], ks[i] if trial % 2 else ks[0])
            assert len(got.pop("prediction_id")) == 32 and want.pop("prediction_id")
            assert json.dumps(got) == json.dumps(want)
    assert answers("m", "3", names, np.zeros((0, 10), np.float32), []) == []
