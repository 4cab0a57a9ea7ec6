"""The monitor's input drift channel: captured images decoded and preprocessed with the version's spec
give the statistics the training run logged for its reference (one definition, two ends), a window's
input channel is used when every capture of it had an image, and a reference without statistics (an
older flywheel's) turns the channel off with one log line.

Real Fashion-MNIST images, real PNG captures (`encode_png`, what the handler stores), the real Monitor
and detector; the track is built in place (no registry) for the window decision, and loaded from an
on-disk reference (the monitor's own reference cache) for the log line."""

from __future__ import annotations

import logging

import numpy as np

from flywheel.contracts.preprocessing import encode_png, to_array
from flywheel.contracts.reference import ReferenceSample, input_statistics


def _fashion():
    from flywheel.core.data import load_splits

    s = load_splits("fashion-mnist", seed=0)
    return s.val.images[:1000], s.test.images[3000:3400], s.test.images[:100], s.preprocess


def _monitor(tmp_path):
    from flywheel.core.config import Settings
    from flywheel.monitoring.service import Monitor, MonitorConfig

    settings = Settings.from_env(work_dir=tmp_path / "home", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return Monitor(MonitorConfig(model="m", capture_uri=str(tmp_path / "caps"), state_dir=tmp_path / "state"),
                   settings)


def test_window_uses_the_input_statistics_of_captured_images(tmp_path):
    from flywheel.core.shifts import corrupt_images
    from flywheel.monitoring.drift import NoveltyDriftDetector
    from flywheel.monitoring.service import Reference, Track

    ref_images, clean, source, spec = _fashion()
    rng = np.random.default_rng(0)
    emb = (np.abs(rng.normal(size=(1000 + 400, 16))) + 0.1).astype(np.float32)  # blind to the shift
    sample = ReferenceSample(emb[:1000], np.arange(1000) % 10, None, np.ones(10) / 10,
                             input_statistics(to_array(ref_images, spec)))
    sample.save(tmp_path / "ref")
    reference = Reference(ReferenceSample.load(tmp_path / "ref"), "run-1")
    detector = NoveltyDriftDetector().fit(reference.embeddings, input_reference=reference.input_stats)
    track = Track("1", reference, detector, "layer", None, None, "none", spec)
    mon = _monitor(tmp_path)
    mon._tracks["1"] = track
    assert track.input_columns == reference.input_stats.shape[1]

    # a capture's PNG, decoded and preprocessed with the version's spec: the training run's statistics
    pngs = [encode_png(img) for img in clean[:100]]
    np.testing.assert_allclose(track.input_statistics(pngs), input_statistics(to_array(clean[:100], spec)))
    with_gap = track.input_statistics([pngs[0], None, b"not a png"])
    assert np.isfinite(with_gap[0]).all() and np.isnan(with_gap[1:]).all()

    def window(images):
        inputs = track.input_statistics([encode_png(img) for img in images])
        pred = np.zeros(len(images), np.int64)
        ts, ids = np.arange(len(images), dtype=float), np.asarray([str(i) for i in range(len(images))])
        return mon._test_window(emb[1000:1000 + len(images)], pred, ts, ids, "1", {}, inputs=inputs), inputs

    shifted = np.concatenate([clean[:80], corrupt_images(source[:20], "brightness", 1, seed=0)])
    flagged, inputs = window(shifted)
    embedding_only = detector.test(emb[1000:1100]).p_value
    assert flagged.p_embedding < 0.01 < embedding_only, (flagged.p_embedding, embedding_only)
    assert flagged.p_embedding == detector.test(emb[1000:1100], inputs).p_value
    # one capture without its image: the window is tested on the embedding channels alone
    inputs[5] = np.nan
    res = mon._test_window(emb[1000:1100], np.zeros(100, np.int64), np.arange(100.0),
                           np.asarray([str(i) for i in range(100)]), "1", {}, inputs=inputs)
    assert res.p_embedding == embedding_only
    calm, _ = window(clean[100:200])
    assert calm.p_embedding > 0.01


def test_reference_without_input_statistics_turns_the_channel_off_once(tmp_path, caplog):
    rng = np.random.default_rng(1)
    mon = _monitor(tmp_path)
    refs = mon.dir / "references"
    ReferenceSample(rng.normal(size=(100, 8)).astype(np.float32), np.arange(100) % 3, None,
                    np.ones(3) / 3).save(refs / "old-run" / "reference")
    with caplog.at_level(logging.WARNING, logger="flywheel"):
        track = mon._load_track("1", "old-run")
    assert track.input_columns == 0 and track.detector.CHANNELS == ("direction", "magnitude")
    off = [r.getMessage() for r in caplog.records if "input drift channel off" in r.getMessage()]
    assert len(off) == 1 and "no input statistics" in off[0], off
    assert np.isnan(track.input_statistics([None])).shape == (1, 0)


def test_track_reads_texture_statistics_where_the_reference_has_a_texture_model(tmp_path, caplog):
    """A reference with a texture model (what log_model writes now): the track's per-capture features are
    `image_features` of the decoded capture (input statistics, then texture statistics), and the
    detector has the texture channel (with the reference's shift directions); a reference with input
    statistics but no texture model (an older flywheel's) keeps the input channel and says in one line that the texture channel is off."""
    from flywheel.component.log import fit_shift_directions, fit_texture
    from flywheel.contracts.reference import image_features
    from flywheel.core.data import load_splits

    ref_images, clean, _, spec = _fashion()
    train = load_splits("fashion-mnist", seed=0).train.images[:2000]
    texture = fit_texture(train, spec)
    x = to_array(ref_images, spec)
    rng = np.random.default_rng(2)
    emb = (np.abs(rng.normal(size=(1000, 8))) + 0.1).astype(np.float32)
    mon = _monitor(tmp_path)
    refs = mon.dir / "references"
    ReferenceSample(emb, np.arange(1000) % 10, None, np.ones(10) / 10, input_statistics(x), texture,
                    texture.statistics(x), fit_shift_directions(train, spec, texture)).save(refs / "new-run" / "reference")
    ReferenceSample(emb, np.arange(1000) % 10, None, np.ones(10) / 10,
                    input_statistics(x)).save(refs / "old-run" / "reference")
    mon._spec_of = lambda version: ("layer", None, spec)  # the versions' component specs (no registry here)
    with caplog.at_level(logging.WARNING, logger="flywheel"):
        new = mon._load_track("1", "new-run")
        old = mon._load_track("2", "old-run")
    assert new.detector.CHANNELS == ("direction", "magnitude", "input", "texture", "texture_shift")
    assert old.detector.CHANNELS == ("direction", "magnitude", "input")
    off = [r.getMessage() for r in caplog.records if "texture drift channel off" in r.getMessage()]
    assert len(off) == 1 and "m v2" in off[0], off
    pngs = [encode_png(img) for img in clean[:50]]
    np.testing.assert_allclose(new.input_statistics(pngs), image_features(to_array(clean[:50], spec), texture),
                               rtol=1e-6)
    assert old.input_statistics(pngs).shape == (50, input_statistics(x).shape[1])
    result = new.detector.test(emb[:50], new.input_statistics(pngs))
    assert "p_texture" in result.details and "p_input" in result.details
    assert new.detector.directions is not None and "directions_shift_texture_shift" in result.details


def test_track_reads_the_residual_and_grain_where_the_reference_has_their_models(tmp_path, caplog):
    """A reference with a pixel subspace and a patch grain (what log_model writes now): the track's per-capture
    features end in the capture's residual outside the subspace and its grain (`image_features` with both), and
    the detector has the pixel channel; a reference without them (an older flywheel's) keeps its other channels
    and says in one line each that the residual and the grain channels are off."""
    from flywheel.component.log import fit_grain, fit_shift_directions, fit_subspace, fit_texture
    from flywheel.contracts.reference import image_features
    from flywheel.core.data import load_splits

    ref_images, clean, _, spec = _fashion()
    train = load_splits("fashion-mnist", seed=0).train.images[:2000]
    texture, subspace, grain = fit_texture(train, spec), fit_subspace(train, spec), fit_grain(train, spec)
    x = to_array(ref_images, spec)
    rng = np.random.default_rng(3)
    emb = (np.abs(rng.normal(size=(1000, 8))) + 0.1).astype(np.float32)
    mon = _monitor(tmp_path)
    refs = mon.dir / "references"
    parts = (input_statistics(x), texture, texture.statistics(x), fit_shift_directions(train, spec, texture))
    ReferenceSample(emb, np.arange(1000) % 10, None, np.ones(10) / 10, *parts, subspace,
                    subspace.residuals(x), grain, grain.scores(x)).save(refs / "new-run" / "reference")
    ReferenceSample(emb, np.arange(1000) % 10, None, np.ones(10) / 10, *parts).save(refs / "old-run" / "reference")
    mon._spec_of = lambda version: ("layer", None, spec)  # the versions' component specs (no registry here)
    with caplog.at_level(logging.WARNING, logger="flywheel"):
        new = mon._load_track("1", "new-run")
        old = mon._load_track("2", "old-run")
    assert new.detector.CHANNELS == ("direction", "magnitude", "input", "texture", "texture_shift", "residual", "grain")
    assert old.detector.CHANNELS == ("direction", "magnitude", "input", "texture", "texture_shift")
    off = [r.getMessage() for r in caplog.records if "residual drift channel off" in r.getMessage()]
    assert len(off) == 1 and "m v2" in off[0], off
    off = [r.getMessage() for r in caplog.records if "grain drift channel off" in r.getMessage()]
    assert len(off) == 1 and "m v2" in off[0], off
    pngs = [encode_png(img) for img in clean[:50]]
    features = new.input_statistics(pngs)
    np.testing.assert_allclose(features, image_features(to_array(clean[:50], spec), texture, subspace, grain),
                               rtol=1e-6)
    assert old.input_statistics(pngs).shape == (50, features.shape[1] - 2)
    result = new.detector.test(emb[:50], features)
    assert "p_residual" in result.details and "p_grain" in result.details and "p_texture_shift" in result.details
