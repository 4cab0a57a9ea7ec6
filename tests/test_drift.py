"""Drift detectors on embeddings of a real model on real Fashion-MNIST (serving_models' v1)."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.monitoring.drift import (
    KSBonferroni,
    NoveltyDriftDetector,
    combine_p_values,
    prediction_drift,
)

ALPHA = 0.01


def _windows(rng, pool, n, size):
    return [pool[rng.choice(len(pool), size, replace=False)] for _ in range(n)]


@pytest.mark.integration
def test_clean_windows_rarely_alarm(fashion_embeddings):
    det = NoveltyDriftDetector().fit(fashion_embeddings.reference)
    rng = np.random.default_rng(0)
    p = [det.test(w).p_value for w in _windows(rng, fashion_embeddings.clean, 200, 100)]
    # Expected 2 of 200 at alpha=0.01; 6 would be p<0.02 under a correct level.
    assert sum(x < ALPHA for x in p) <= 6, sorted(p)[:10]


@pytest.mark.integration
@pytest.mark.parametrize("shift", ["invert", "rotate"])
def test_partial_contamination_detected(fashion_embeddings, shift):
    det = NoveltyDriftDetector().fit(fashion_embeddings.reference)  # what the monitor runs
    base = KSBonferroni(16).fit(fashion_embeddings.reference)
    rng = np.random.default_rng(1)
    hits = base_hits = 0
    trials = 60
    for _ in range(trials):
        clean = fashion_embeddings.clean[rng.choice(len(fashion_embeddings.clean), 80, replace=False)]
        bad = fashion_embeddings.shifted[shift]
        window = np.concatenate([clean, bad[rng.choice(len(bad), 20, replace=False)]])
        hits += det.test(window).p_value < ALPHA
        base_hits += base.test(window).p_value < ALPHA
    # 20% of a 100-image window shifted: detected nearly always, and at least as often as plain KS.
    assert hits / trials >= 0.9, (hits, base_hits)
    assert hits >= base_hits


@pytest.mark.integration
def test_fully_shifted_small_window(fashion_embeddings):
    det = NoveltyDriftDetector().fit(fashion_embeddings.reference)
    # the smallest p-value the rank null's simulations can give, times the two channels
    assert det.test(fashion_embeddings.shifted["invert"][:20]).p_value <= 2 / (det.simulations + 1)


def test_detector_rejects_bad_input():
    rng = np.random.default_rng(0)
    det = NoveltyDriftDetector().fit(rng.normal(size=(200, 8)))
    with pytest.raises(ValueError, match="window must be"):
        det.test(rng.normal(size=(10, 9)))
    with pytest.raises(ValueError, match="reference must be"):
        NoveltyDriftDetector().fit(rng.normal(size=(5, 8)))


def test_rank_null_holds_its_level_on_exchangeable_data():
    """Reference and windows from one distribution: p-values are valid (false alarms <= alpha) over
    many references, and a window whose samples are all beyond the reference is at the floor."""
    rng = np.random.default_rng(0)
    p = []
    for _ in range(60):
        det = NoveltyDriftDetector(simulations=4000).fit(np.abs(rng.normal(size=(400, 8))) + 0.1)
        p += [det.test(np.abs(rng.normal(size=(50, 8))) + 0.1).p_value for _ in range(10)]
    p = np.asarray(p)
    # 600 windows: expected <= 6 below 0.01 and <= 60 below 0.1 (Bonferroni makes it conservative)
    assert (p < 0.01).sum() <= 14 and (p < 0.1).sum() <= 80, np.sort(p)[:20]
    far = det.test(0.01 * (np.abs(rng.normal(size=(50, 8))) + 0.1))  # tiny norms: magnitude channel
    assert far.p_value <= 2 / (det.simulations + 1) and far.details["p_magnitude"] < far.details["p_direction"]


def test_vectorised_ks_matches_scipy():
    from scipy import stats

    from flywheel.monitoring.drift import ks_2samp_columns

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1000, 4))
    window = rng.normal(size=(100, 4)) + np.array([0.0, 0.1, 0.3, 1.0])
    ours = ks_2samp_columns(np.sort(ref, axis=0), window)
    theirs = [stats.ks_2samp(ref[:, j], window[:, j]).pvalue for j in range(4)]
    np.testing.assert_allclose(ours, theirs, atol=0.02)


def test_prediction_drift_chi_square():
    ref = np.array([100] * 10)
    assert prediction_drift(np.array([10] * 10), ref).p_value > 0.5
    skewed = np.array([55, 5, 5, 5, 5, 5, 5, 5, 5, 5])
    assert prediction_drift(skewed, ref).p_value < 1e-6
    # sparse classes are pooled instead of breaking the chi-square approximation
    sparse = prediction_drift(np.array([50, 48, 1, 1, 0, 0, 0, 0, 0, 0]), np.array([500, 480, 5, 5, 3, 2, 2, 1, 1, 1]))
    assert sparse.p_value > 0.05 and sparse.details["dof"] == 2
    assert prediction_drift(np.zeros(10), ref).p_value == 1.0
    assert combine_p_values([0.004, 0.5]) == pytest.approx(0.008)


def test_the_monitors_decision_gives_the_prediction_test_a_twentieth_of_alpha():
    """The window's p-value: novelty at 19/20 of alpha, the prediction-drift chi-square at 1/20 (weighted
    Bonferroni); a strong class-mix change still decides alone, a mild one no longer does."""
    from flywheel.monitoring.drift import PREDICTION_SHARE, window_decision_p

    assert PREDICTION_SHARE == pytest.approx(1 / 20)
    assert window_decision_p(0.0095, 1.0) == pytest.approx(0.01)
    assert window_decision_p(1.0, 0.0004) == pytest.approx(0.008)
    assert window_decision_p(0.5, 0.004) == pytest.approx(0.08)  # flagged at alpha/2 before, not now
    assert window_decision_p(1.0, 1.0) == 1.0
    np.testing.assert_allclose(window_decision_p(np.array([0.0095, 1.0]), np.array([1.0, 0.0004])), [0.01, 0.008])
    ref = np.array([100] * 10)
    one_class_at_30 = np.array([30] + [7] * 7 + [8] * 2)  # a window of 100 in which one class went from 10% to 30%
    assert window_decision_p(1.0, prediction_drift(one_class_at_30, ref).p_value) < 0.01


# ------------------------------------------------------------------ the benchmark's peers and batch paths
def test_window_p_values_of_many_windows_equal_one_test_each():
    """benchmarks/drift.py scores a pool once and tests windows in batches: the same numbers as `test`."""
    rng = np.random.default_rng(3)
    ref = np.abs(rng.normal(size=(300, 12))) + 0.1
    pool = np.concatenate([np.abs(rng.normal(size=(200, 12))) + 0.1, np.abs(rng.normal(size=(50, 12))) * 2])
    det = NoveltyDriftDetector(simulations=4000).fit(ref)
    windows = np.stack([rng.choice(len(pool), 40, replace=False) for _ in range(6)])
    u = det.p_values(pool)
    batch, _ = det.window_p_values({c: v[windows] for c, v in u.items()})
    np.testing.assert_allclose(batch, [det.test(pool[w]).p_value for w in windows])
    ks = KSBonferroni(4).fit(ref)
    np.testing.assert_allclose(ks.window_p_values(ks.transform(pool)[windows]),
                               [ks.test(pool[w]).p_value for w in windows])


def test_bbsd_and_mmd_hold_their_level_and_see_a_shift():
    from flywheel.monitoring.drift import BBSD, MMDPermutation

    rng = np.random.default_rng(4)

    def probs(n, shift=0.0):
        logits = rng.normal(size=(n, 5)) * 2
        logits[:, 0] += shift
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    bbsd = BBSD().fit(probs(1000))
    assert sum(bbsd.test(probs(100)).p_value < ALPHA for _ in range(100)) <= 4
    assert bbsd.test(probs(100, shift=3.0)).p_value < ALPHA
    ref = rng.normal(size=(300, 6))
    mmd = MMDPermutation(permutations=100, seed=0).fit(ref)
    clean = [mmd.test(rng.normal(size=(50, 6))).p_value for _ in range(40)]
    assert sum(p < ALPHA for p in clean) <= 3 and min(clean) >= 1 / 101
    assert mmd.test(rng.normal(size=(50, 6)) + 1.0).p_value < ALPHA


# ------------------------------------------------------------------ the input channel
def _fashion_input_stats():
    """Input statistics of real Fashion-MNIST images as the default model sees them: a reference
    sample of the validation split, clean test images, and test images brightened by 15% of full scale
    (brightness 1, a tuning family of benchmarks/drift.py: it costs the default model about 5 points of
    accuracy and its embedding channels catch a third of such windows)."""
    from flywheel.contracts.preprocessing import to_array
    from flywheel.contracts.reference import input_statistics
    from flywheel.core.data import load_splits
    from flywheel.core.shifts import corrupt_images

    s = load_splits("fashion-mnist", seed=0)
    ref = s.val.images[np.random.default_rng(0).permutation(len(s.val))[:1000]]
    clean, source = s.test.images[3000:6000], s.test.images[:600]
    return tuple(input_statistics(to_array(x, s.preprocess))
                 for x in (ref, clean, corrupt_images(source, "brightness", 1, seed=0)))


def test_input_statistics_any_channels_and_size():
    from flywheel.contracts.reference import input_statistic_names, input_statistics

    rng = np.random.default_rng(0)
    for shape in ((5, 1, 28, 28), (4, 3, 48, 40), (2, 3, 3, 3)):
        x = rng.normal(size=shape).astype(np.float32)
        out = input_statistics(x)
        assert out.shape == (shape[0], len(input_statistic_names(shape[1]))) and np.isfinite(out).all()
    flat = input_statistics(np.zeros((2, 1, 8, 8), np.float32))  # a constant image: defined, finite
    assert np.isfinite(flat).all()
    with pytest.raises(ValueError, match="input statistics need"):
        input_statistics(np.zeros((2, 28, 28)))


def test_input_channel_flags_a_shift_the_embedding_alone_misses():
    """Windows whose embeddings are exchangeable with the reference's (a model blind to the shift) but
    20% of whose images are brightened: the embedding channels see nothing, the input channel flags them."""
    ref_inp, clean_inp, shifted_inp = _fashion_input_stats()
    rng = np.random.default_rng(1)
    emb = np.abs(rng.normal(size=(1000 + 3000, 16))) + 0.1  # one distribution for reference and traffic
    both = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_inp)
    alone = NoveltyDriftDetector(simulations=4000).fit(emb[:1000])
    assert both.CHANNELS == ("direction", "magnitude", "input") and alone.CHANNELS == ("direction", "magnitude")
    hits = alone_hits = 0
    trials = 40
    for _ in range(trials):
        c = rng.choice(3000, 80, replace=False)
        n = rng.choice(len(shifted_inp), 20, replace=False)
        window_emb = emb[1000:][np.concatenate([c, rng.choice(3000, 20, replace=False)])]
        window_inp = np.concatenate([clean_inp[c], shifted_inp[n]])
        result = both.test(window_emb, window_inp)
        hits += result.p_value < ALPHA
        alone_hits += alone.test(window_emb).p_value < ALPHA
    assert hits / trials >= 0.9 and alone_hits <= 3, (hits, alone_hits)


def test_input_channel_holds_its_level_on_clean_windows():
    """Clean test images against a validation-split reference: false alarms of the three-channel test
    stay at the level (Bonferroni over the channels), and without statistics a window falls back to
    the embedding channels alone."""
    ref_inp, clean_inp, _ = _fashion_input_stats()
    rng = np.random.default_rng(2)
    emb = np.abs(rng.normal(size=(1000 + 3000, 16))) + 0.1
    det = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_inp)
    p = []
    for _ in range(200):
        w = rng.choice(3000, 100, replace=False)
        p.append(det.test(emb[1000:][w], clean_inp[w]).p_value)
    # Expected <= 2 of 200 at alpha=0.01; 6 would be p<0.02 under a correct level.
    assert sum(x < ALPHA for x in p) <= 6, sorted(p)[:10]
    fallback = det.test(emb[1000:1100])
    assert "p_input" not in fallback.details and "p_direction" in fallback.details
    with pytest.raises(ValueError, match="inputs must be"):
        det.test(emb[1000:1100], clean_inp[:100, :3])
    with pytest.raises(ValueError, match="input_reference must be"):
        NoveltyDriftDetector().fit(emb[:1000], input_reference=ref_inp[:10])


def test_reference_sample_keeps_input_statistics_and_reads_old_references(tmp_path):
    from flywheel.contracts.reference import INPUT_STATS_META, ReferenceSample

    rng = np.random.default_rng(3)
    sample = ReferenceSample(rng.normal(size=(50, 4)).astype(np.float32), np.arange(50) % 3, None,
                             np.ones(3) / 3, rng.normal(size=(50, 12)))
    sample.save(tmp_path / "new")
    loaded = ReferenceSample.load(tmp_path / "new")
    np.testing.assert_allclose(loaded.input_stats, sample.input_stats, rtol=1e-6)
    ReferenceSample(sample.embeddings, sample.predictions, None, sample.class_priors).save(tmp_path / "old")
    assert ReferenceSample.load(tmp_path / "old").input_stats is None  # an older flywheel's reference
    (tmp_path / "new" / INPUT_STATS_META).write_text('{"version": 0, "columns": 12}')
    assert ReferenceSample.load(tmp_path / "new").input_stats is None  # another statistics version


def _as_another_version(path) -> None:
    """Rewrite a versioned .npz of the reference as another version of its format would have written it."""
    with np.load(path) as z:
        np.savez(path, **{**dict(z), "version": 0})


def _features(splits, texture, images):
    from flywheel.contracts.preprocessing import to_array
    from flywheel.contracts.reference import image_features

    return image_features(to_array(images, splits.preprocess), texture)


@pytest.fixture(scope="module")
def fashion_texture():
    """Real Fashion-MNIST: a texture model fitted on training images as log_model fits it, and the image
    features of a 1000-image validation reference and of 3000 clean test images."""
    from flywheel.component.log import fit_texture
    from flywheel.core.data import load_splits

    s = load_splits("fashion-mnist", seed=0)
    texture = fit_texture(s.train.images, s.preprocess)
    ref = s.val.images[np.random.default_rng(0).permutation(len(s.val))[:1000]]
    return s, texture, _features(s, texture, ref), _features(s, texture, s.test.images[3000:6000])


def _fifth_shifted_windows(rng, clean_f, shifted_f, windows: int = 200):
    """`windows` random windows of 100 of the clean images (their indices), and the same windows with their
    last 20 swapped for random shifted images (their features)."""
    clean, mixed = [], []
    for _ in range(windows):
        w = rng.choice(len(clean_f), 100, replace=False)
        clean.append(w)
        mixed.append(np.concatenate([clean_f[w[:80]], shifted_f[rng.choice(len(shifted_f), 20, replace=False)]]))
    return clean, mixed


def _with_pixel_scores(fashion_texture, family: str, subspace, grain):
    """The fixture's reference and clean features, and those of 300 test images through `family` at severity
    1, each followed by their pixel-score columns with `subspace` and `grain` (`pixel_scores`); an embedding
    of 1000 + 3000 samples blind to the shift, and the generator that drew it, for the windows."""
    from flywheel.contracts.preprocessing import to_array
    from flywheel.contracts.reference import pixel_scores
    from flywheel.core.shifts import corrupt_images

    s, texture, ref_f, clean_f = fashion_texture
    ref_images = s.val.images[np.random.default_rng(0).permutation(len(s.val))[:1000]]  # the fixture's reference
    shifted = corrupt_images(s.test.images[:300], family, 1, seed=0)

    def with_scores(features, images):
        return np.hstack([features, *pixel_scores(to_array(images, s.preprocess), subspace, grain)])

    rng = np.random.default_rng(9)
    emb = np.abs(rng.normal(size=(1000 + 3000, 16))) + 0.1
    return (with_scores(ref_f, ref_images), with_scores(clean_f, s.test.images[3000:6000]),
            with_scores(_features(s, texture, shifted), shifted), emb, rng)


def _assert_batch_path_is_test(det, emb, clean, mixed, results, channel: str) -> None:
    """The batch path the benchmark takes (`window_inputs` + `window_p_values`) gives `test`'s p-values, the
    window's and `channel`'s, on the first 20 windows."""
    batch = det.window_inputs(emb[np.concatenate(clean[:20])], np.concatenate(mixed[:20]))
    p, per = det.window_p_values({c: v.reshape(20, 100, *v.shape[1:]) for c, v in batch.items()})
    np.testing.assert_allclose(p, [r.p_value for r in results[:20]])
    np.testing.assert_allclose(per[channel], [r.details[f"p_{channel}"] for r in results[:20]])


def test_texture_channel_holds_its_level_and_catches_what_the_other_channels_miss(fashion_texture):
    """The fourth channel on real Fashion-MNIST images: a texture model fitted on training images (as
    log_model fits it), the reference's own scores as calibration. Clean windows alarm at about alpha;
    windows with 20% of their images under impulse noise at severity 1 (a held-out family of
    benchmarks/drift.py that costs the default model ~14 points and that the input channel misses most
    of the time) are flagged by the texture channel."""
    from flywheel.core.shifts import corrupt_images

    s, texture, ref_f, clean_f = fashion_texture
    noisy_f = _features(s, texture, corrupt_images(s.test.images[:200], "impulse-noise", 1, seed=0))
    rng = np.random.default_rng(4)
    emb = np.abs(rng.normal(size=(1000 + 3000, 16))) + 0.1  # an embedding blind to the shift
    det = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_f, texture=texture)
    assert det.CHANNELS == ("direction", "magnitude", "input", "texture", "texture_shift")
    inputs_only = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_f[:, :-texture.columns])
    p, caught, caught_without = [], 0, 0
    for _ in range(200):
        w = rng.choice(3000, 100, replace=False)
        p.append(det.test(emb[1000:][w], clean_f[w]).p_value)
        mixed = np.concatenate([clean_f[w[:80]], noisy_f[rng.choice(200, 20, replace=False)]])
        res = det.test(emb[1000:][w], mixed)
        caught += res.p_value < ALPHA and res.details["p_texture"] < res.details["p_input"]
        caught_without += inputs_only.test(emb[1000:][w], mixed[:, :-texture.columns]).p_value < ALPHA
    # Expected <= 2 of 200 at alpha=0.01; 6 would be p<0.02 under a correct level.
    assert sum(x < ALPHA for x in p) <= 6, sorted(p)[:10]
    assert caught >= 170 and caught_without <= 90, (caught, caught_without)  # 185 and 45 here
    with pytest.raises(ValueError, match="not input statistics followed by"):
        NoveltyDriftDetector().fit(emb[:1000], input_reference=ref_f[:, :texture.columns], texture=texture)


def test_texture_shift_channel_sees_a_mild_shift_no_single_image_stands_out_in(fashion_texture):
    """The fifth channel on real Fashion-MNIST images: shot noise at severity 2 (a held-out family of
    benchmarks/drift.py costing the default model ~8 points) moves most images' texture a little and few
    into any novelty channel's tails. With 20% of each window shot-noised, the window's mean texture
    (clipped, whitened shift vectors) is flagged where the four per-sample channels mostly are not;
    clean windows alarm at about alpha; the batch path the benchmark takes equals `test`."""
    from flywheel.core.shifts import corrupt_images

    s, texture, ref_f, clean_f = fashion_texture
    noisy_f = _features(s, texture, corrupt_images(s.test.images[:300], "shot-noise", 2, seed=0))
    rng = np.random.default_rng(6)
    emb = np.abs(rng.normal(size=(1000 + 3000, 16))) + 0.1  # an embedding blind to the shift
    det = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_f, texture=texture)
    clean, mixed = _fifth_shifted_windows(rng, clean_f, noisy_f)
    clean_p = [det.test(emb[1000:][w], clean_f[w]).p_value for w in clean]
    results = [det.test(emb[1000:][w], m) for w, m in zip(clean, mixed, strict=True)]
    caught = sum(r.p_value < ALPHA and r.details["p_texture_shift"] < ALPHA / 5 for r in results)
    # the same windows without the channel: the four per-sample channels, Bonferroni over four
    u = {c: np.stack([det.p_values(emb[1000:][w], m)[c] for w, m in zip(clean, mixed, strict=True)])
         for c in det.CHANNELS[:4]}
    caught_without = int((det.window_p_values(u)[0] < ALPHA).sum())
    assert sum(p < ALPHA for p in clean_p) <= 6, sorted(clean_p)[:10]  # expected <= 2 of 200 at alpha
    assert caught >= 190 and caught_without <= 170, (caught, caught_without)  # 200 and 142 here
    _assert_batch_path_is_test(det, emb[1000:], clean, mixed, results, "texture_shift")


def test_shift_directions_from_tuning_corruptions_see_a_held_out_shift_the_mean_texture_alone_misses(fashion_texture):
    """The texture-shift channel along the directions the TUNING corruptions move image statistics in
    (fitted on training images as log_model fits them): scale at severity 1, a held-out family of
    benchmarks/drift.py (zoomed out to 85%, ~7 points on the default model), at 20% of each window, is
    flagged far more often than by the window's mean texture alone; clean windows alarm at about alpha;
    the batch path the benchmark takes equals `test`."""
    from flywheel.component.log import fit_shift_directions
    from flywheel.core.shifts import TUNING_FAMILIES, corrupt_images

    s, texture, ref_f, clean_f = fashion_texture
    directions = fit_shift_directions(s.train.images, s.preprocess, texture)
    assert "scale" not in TUNING_FAMILIES and directions.directions.shape == (10, ref_f.shape[1])
    zoomed_f = _features(s, texture, corrupt_images(s.test.images[:300], "scale", 1, seed=0))
    rng = np.random.default_rng(7)
    emb = np.abs(rng.normal(size=(1000 + 3000, 16))) + 0.1  # an embedding blind to the shift
    det = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_f, texture=texture,
                                                     directions=directions)
    without = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_f, texture=texture)
    clean, mixed = _fifth_shifted_windows(rng, clean_f, zoomed_f)
    clean_p = [det.test(emb[1000:][w], clean_f[w]).p_value for w in clean]
    results = [det.test(emb[1000:][w], m) for w, m in zip(clean, mixed, strict=True)]
    caught = sum(r.p_value < ALPHA for r in results)
    caught_without = sum(without.test(emb[1000:][w], m).p_value < ALPHA for w, m in zip(clean, mixed, strict=True))
    assert sum(p < ALPHA for p in clean_p) <= 6, sorted(clean_p)[:10]  # expected <= 2 of 200 at alpha
    assert caught >= 190 and caught_without <= 160, (caught, caught_without)  # 198 and 128 here
    assert {"mean_shift_texture_shift", "directions_shift_texture_shift"} <= set(results[0].details)
    batch = det.window_inputs(emb[1000:][np.concatenate(clean[:20])], np.concatenate(mixed[:20]))
    assert batch["texture_shift"].shape == (2000, texture.columns + 10)
    _assert_batch_path_is_test(det, emb[1000:], clean, mixed, results, "texture_shift")


def test_reference_sample_keeps_its_shift_directions_and_drops_another_versions(tmp_path):
    from flywheel.contracts.reference import SHIFT_DIRECTIONS, ReferenceSample, ShiftDirections, TextureModel

    rng = np.random.default_rng(8)
    texture = TextureModel.fit(rng.normal(size=(300, 1, 12, 12)).astype(np.float32))
    features = np.hstack([rng.normal(size=(300, 12)), texture.statistics(rng.normal(size=(300, 1, 12, 12)))])
    moved = [features[:100] + rng.normal(size=features.shape[1]) for _ in range(4)]
    directions = ShiftDirections.fit(features[:, :12], features[:100], moved, texture, count=3)
    np.testing.assert_allclose(directions.directions @ directions.directions.T, np.eye(3), atol=1e-9)
    sample = ReferenceSample(rng.normal(size=(50, 4)).astype(np.float32), np.arange(50) % 3, None, np.ones(3) / 3,
                             features[:50, :12], texture, features[:50, 12:], directions)
    sample.save(tmp_path / "new")
    loaded = ReferenceSample.load(tmp_path / "new").shift_directions
    np.testing.assert_array_equal(loaded.directions, directions.directions)
    np.testing.assert_allclose(loaded.project(features, texture), directions.project(features, texture))
    _as_another_version(tmp_path / "new" / SHIFT_DIRECTIONS)
    old = ReferenceSample.load(tmp_path / "new")
    assert old.shift_directions is None and old.texture is not None  # the channel runs without them
    with pytest.raises(ValueError, match="shift directions need"):
        ShiftDirections.fit(features[:, :12], features[:100], [], texture)


def test_reference_sample_keeps_its_texture_model_and_drops_another_versions(tmp_path):
    from flywheel.contracts.reference import TEXTURE, ReferenceSample, TextureModel

    rng = np.random.default_rng(5)
    texture = TextureModel.fit(rng.normal(size=(300, 1, 12, 12)).astype(np.float32))
    stats = texture.statistics(rng.normal(size=(50, 1, 12, 12)).astype(np.float32))
    sample = ReferenceSample(rng.normal(size=(50, 4)).astype(np.float32), np.arange(50) % 3, None,
                             np.ones(3) / 3, rng.normal(size=(50, 12)), texture, stats)
    sample.save(tmp_path / "new")
    loaded = ReferenceSample.load(tmp_path / "new")
    for name in ("filters", "mean", "scale", "precision"):
        np.testing.assert_array_equal(getattr(loaded.texture, name), getattr(texture, name))
    np.testing.assert_array_equal(loaded.texture_stats, stats)
    np.testing.assert_allclose(loaded.texture.score(stats), texture.score(stats))
    with pytest.raises(ValueError, match="texture_stats must be"):
        ReferenceSample(sample.embeddings, sample.predictions, None, sample.class_priors, sample.input_stats,
                        texture, stats[:10]).save(tmp_path / "bad")
    _as_another_version(tmp_path / "new" / TEXTURE)
    old = ReferenceSample.load(tmp_path / "new")
    assert old.texture is None and old.texture_stats is None and old.input_stats is not None


def test_residual_channel_catches_mild_spatter_every_other_channel_misses_and_holds_its_level(fashion_texture):
    """The sixth channel on real Fashion-MNIST images: a pixel subspace fitted on training images (as
    log_model fits it), the reference's own residuals as calibration. Spatter at severity 1 (a held-out
    family of benchmarks/drift.py: 5% of the image under grey blobs, ~4 points on the default model) at 20%
    of each window is flagged, by the residual channel, where the five other channels mostly miss it; clean
    windows alarm at about alpha; the batch path the benchmark takes equals `test`."""
    from flywheel.component.log import fit_subspace

    s, texture = fashion_texture[:2]
    subspace = fit_subspace(s.train.images, s.preprocess)
    assert subspace.pool == 1 and 500 < subspace.components < 784  # all but 0.1% of the pixel variance
    assert subspace.outside and subspace.basis.shape == (784 - subspace.components, 784)  # the smaller side
    ref_r, clean_r, spatter_r, emb, rng = _with_pixel_scores(fashion_texture, "spatter", subspace, None)
    det = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_r, texture=texture,
                                                     subspace=subspace)
    assert det.CHANNELS == ("direction", "magnitude", "input", "texture", "texture_shift", "residual")
    without = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_r[:, :-1], texture=texture)
    clean, mixed = _fifth_shifted_windows(rng, clean_r, spatter_r)
    clean_p = [det.test(emb[1000:][w], clean_r[w]).p_value for w in clean]
    results = [det.test(emb[1000:][w], m) for w, m in zip(clean, mixed, strict=True)]
    caught = sum(r.p_value < ALPHA and r.details["p_residual"] < ALPHA / 6 for r in results)
    caught_without = sum(without.test(emb[1000:][w], m[:, :-1]).p_value < ALPHA
                         for w, m in zip(clean, mixed, strict=True))
    assert sum(p < ALPHA for p in clean_p) <= 6, sorted(clean_p)[:10]  # expected <= 2 of 200 at alpha
    assert caught >= 180 and caught_without <= 100, (caught, caught_without)  # 200 and 36 here
    _assert_batch_path_is_test(det, emb[1000:], clean, mixed, results, "residual")
    with pytest.raises(ValueError, match="not input statistics followed by"):
        NoveltyDriftDetector().fit(emb[:1000], input_reference=ref_r[:, :1], subspace=subspace)


def test_grain_channel_catches_mild_shot_noise_the_others_half_miss_and_holds_its_level(fashion_texture):
    """The seventh channel on real Fashion-MNIST images: a patch grain fitted on training images (as log_model
    fits it), the reference's own scores as calibration. Shot noise at severity 1 (a held-out family of
    benchmarks/drift.py: Poisson noise of 60 photons at full scale, ~4 points on the default model) at 20% of
    each window is flagged, by the grain channel at its twentieth of alpha, where the six other channels miss
    about half of them (as in benchmarks/drift.py, 0.53-0.58); clean windows alarm at about alpha; the batch
    path the benchmark takes equals `test`."""
    from flywheel.component.log import fit_grain, fit_subspace
    from flywheel.monitoring.drift import CHANNEL_SHARES

    s, texture = fashion_texture[:2]
    subspace, grain = fit_subspace(s.train.images, s.preprocess), fit_grain(s.train.images, s.preprocess)
    ref_p, clean_p, noisy_p, emb, rng = _with_pixel_scores(fashion_texture, "shot-noise", subspace, grain)
    det = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_p, texture=texture,
                                                     subspace=subspace, grain=grain)
    assert det.CHANNELS == ("direction", "magnitude", "input", "texture", "texture_shift", "residual", "grain")
    residual_only = NoveltyDriftDetector(simulations=4000).fit(emb[:1000], input_reference=ref_p[:, :-1],
                                                               texture=texture, subspace=subspace)
    clean, mixed = _fifth_shifted_windows(rng, clean_p, noisy_p)
    clean_pv = [det.test(emb[1000:][w], clean_p[w]).p_value for w in clean]
    results = [det.test(emb[1000:][w], m) for w, m in zip(clean, mixed, strict=True)]
    caught = sum(r.p_value < ALPHA and r.details["p_grain"] < ALPHA * CHANNEL_SHARES["grain"] for r in results)
    caught_without = sum(residual_only.test(emb[1000:][w], m[:, :-1]).p_value < ALPHA
                         for w, m in zip(clean, mixed, strict=True))
    assert sum(p < ALPHA for p in clean_pv) <= 6, sorted(clean_pv)[:10]  # expected <= 2 of 200 at alpha
    assert caught >= 180 and caught_without <= 140, (caught, caught_without)  # without: about half
    _assert_batch_path_is_test(det, emb[1000:], clean, mixed, results, "grain")
    with pytest.raises(ValueError, match="not input statistics followed by"):
        NoveltyDriftDetector().fit(emb[:1000], input_reference=ref_p[:, :2], subspace=subspace, grain=grain)


def test_channels_share_alpha_by_weighted_bonferroni_the_grain_channel_a_twentieth():
    """The window's p-value is the min over channels of p / share: the grain channel tested at alpha / 20, the
    others sharing the rest equally; without the grain channel (an older reference), plain Bonferroni."""
    from flywheel.monitoring.drift import channel_weights

    seven = ("direction", "magnitude", "input", "texture", "texture_shift", "residual", "grain")
    weights = channel_weights(seven)
    assert weights["grain"] == pytest.approx(1 / 20) and sum(weights.values()) == pytest.approx(1)
    assert all(weights[c] == pytest.approx(19 / 120) for c in seven[:-1])
    assert channel_weights(seven[:-1]) == pytest.approx({c: 1 / 6 for c in seven[:-1]})
    assert channel_weights(("grain",)) == {"grain": 1.0}
    rng = np.random.default_rng(16)
    det = NoveltyDriftDetector(simulations=2000).fit(np.abs(rng.normal(size=(200, 4))) + 0.1)
    u = {c: rng.random((30, 20)) for c in det.CHANNELS}
    combined, per = det.window_p_values(u)
    np.testing.assert_allclose(combined, np.minimum(1, 2 * np.minimum(per["direction"], per["magnitude"])))


def test_pixel_subspace_pools_large_images_and_refuses_images_of_another_size():
    from flywheel.contracts.reference import SUBSPACE_MAX_VALUES, PixelSubspace

    rng = np.random.default_rng(10)
    big = PixelSubspace.fit(rng.normal(size=(40, 3, 100, 90)).astype(np.float32))
    assert big.pool == 4 and big.mean.shape == (3 * 25 * 22,) and len(big.mean) <= SUBSPACE_MAX_VALUES
    np.testing.assert_allclose(big.basis @ big.basis.T, np.eye(len(big.basis)), atol=1e-5)  # orthonormal rows
    assert big.residuals(rng.normal(size=(5, 3, 100, 90))).shape == (5,)
    with pytest.raises(ValueError, match="not the images it was fitted on"):
        big.residuals(rng.normal(size=(5, 3, 64, 64)))
    # images on a low-dimensional manifold: the residual of one off it is far larger than of those on it
    basis = rng.normal(size=(4, 64))
    on = (rng.normal(size=(300, 4)) @ basis).reshape(300, 1, 8, 8)
    small = PixelSubspace.fit(on[:200])
    assert small.components <= 4 and not small.outside and len(small.basis) == small.components
    off = on[200:] + 0.5 * rng.normal(size=on[200:].shape)
    assert small.residuals(off).min() > small.residuals(on[200:]).max()
    with pytest.raises(ValueError, match="at least 2 images"):
        PixelSubspace.fit(on[:1])


def test_reference_sample_keeps_its_pixel_subspace_and_drops_another_versions(tmp_path):
    from flywheel.contracts.reference import SUBSPACE, PixelSubspace, ReferenceSample

    rng = np.random.default_rng(11)
    subspace = PixelSubspace.fit(rng.normal(size=(300, 1, 12, 12)).astype(np.float32))
    residuals = subspace.residuals(rng.normal(size=(50, 1, 12, 12)))
    sample = ReferenceSample(rng.normal(size=(50, 4)).astype(np.float32), np.arange(50) % 3, None, np.ones(3) / 3,
                             rng.normal(size=(50, 12)), subspace=subspace, residuals=residuals)
    sample.save(tmp_path / "new")
    loaded = ReferenceSample.load(tmp_path / "new")
    np.testing.assert_array_equal(loaded.subspace.basis, subspace.basis)
    np.testing.assert_array_equal(loaded.residuals, residuals)
    x = rng.normal(size=(7, 1, 12, 12))
    np.testing.assert_allclose(loaded.subspace.residuals(x), subspace.residuals(x))
    with pytest.raises(ValueError, match="residuals must be"):
        ReferenceSample(sample.embeddings, sample.predictions, None, sample.class_priors, sample.input_stats,
                        subspace=subspace, residuals=residuals[:10]).save(tmp_path / "bad")
    _as_another_version(tmp_path / "new" / SUBSPACE)
    old = ReferenceSample.load(tmp_path / "new")
    assert old.subspace is None and old.residuals is None and old.input_stats is not None


def test_shift_null_takes_its_own_simulation_count_and_the_rank_null_keeps_simulations():
    """`shift_simulations` sizes the texture-shift channel's null alone (default: `simulations`): what
    benchmarks/drift_level.py --rank-simulations relies on to refine the rank null without the per-reference cost."""
    from flywheel.contracts.reference import TextureModel, image_features

    rng = np.random.default_rng(15)
    x = rng.random((300, 1, 8, 8)).astype(np.float32)
    texture = TextureModel.fit(x[:100])
    emb, features = np.abs(rng.normal(size=(200, 4))) + 0.1, image_features(x[100:], texture)
    same = NoveltyDriftDetector(simulations=3000).fit(emb, input_reference=features, texture=texture)
    apart = NoveltyDriftDetector(simulations=3000, shift_simulations=1000).fit(emb, input_reference=features,
                                                                             texture=texture)
    assert len(same._shift_null(20)[0]) == 3000 and len(apart._shift_null(20)[0]) == 1000
    u = rng.random((5, 20))
    np.testing.assert_array_equal(same.tail_p_values(u), apart.tail_p_values(u))


def test_patch_grain_finds_the_weakest_patch_direction_and_scores_grain_not_contrast():
    from flywheel.contracts.reference import GRAIN_MIN_STD, PatchGrain

    rng = np.random.default_rng(12)
    # smooth training images: blurred noise, so neighbouring pixels agree and the checkerboard is weakest
    smooth = rng.normal(size=(60, 1, 20, 20))
    for _ in range(3):
        smooth = (smooth + np.roll(smooth, 1, 2) + np.roll(smooth, 1, 3) + np.roll(smooth, (1, 1), (2, 3))) / 4
    grain = PatchGrain.fit(smooth.astype(np.float32), value_range=1.0)
    assert grain.min_std == GRAIN_MIN_STD
    assert abs(np.linalg.norm(grain.mask) - 1) < 1e-9 and abs(grain.mask.sum()) < 1e-9  # unit, blind to the mean
    checker = np.array([[1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=np.float64).ravel()
    checker -= checker.mean()
    assert abs(grain.mask @ checker) / np.linalg.norm(checker) > 0.8
    held_out = smooth[:20]
    noisy = held_out + 0.3 * held_out.std() * rng.normal(size=held_out.shape)
    assert grain.scores(noisy).min() > grain.scores(held_out).max()
    np.testing.assert_allclose(grain.scores(5 * held_out - 2), grain.scores(held_out), rtol=1e-5)  # a share: contrast cancels
    assert (grain.scores(np.zeros((3, 1, 20, 20))) == 0).all()  # no textured patch, no grain
    assert grain.scores(rng.normal(size=(2, 3, 40, 30))).shape == (2,)  # any channels and size: the channel mean
    with pytest.raises(ValueError, match="preprocessed inputs"):
        grain.scores(np.zeros((2, 1, 2, 20)))
    with pytest.raises(ValueError, match="at least 9 textured"):
        PatchGrain.fit(np.zeros((5, 1, 10, 10), np.float32), value_range=1.0)
    with pytest.raises(ValueError, match="positive number"):
        PatchGrain.fit(smooth.astype(np.float32), value_range=0.0)


def test_reference_sample_keeps_its_patch_grain_and_drops_another_versions(tmp_path):
    from flywheel.contracts.reference import GRAIN, PatchGrain, ReferenceSample

    rng = np.random.default_rng(13)
    grain = PatchGrain.fit(rng.normal(size=(30, 1, 12, 12)).astype(np.float32), value_range=1.0)
    scores = grain.scores(rng.normal(size=(50, 1, 12, 12)))
    sample = ReferenceSample(rng.normal(size=(50, 4)).astype(np.float32), np.arange(50) % 3, None, np.ones(3) / 3,
                             rng.normal(size=(50, 12)), grain=grain, grain_scores=scores)
    sample.save(tmp_path / "new")
    loaded = ReferenceSample.load(tmp_path / "new")
    np.testing.assert_array_equal(loaded.grain.mask, grain.mask)
    assert loaded.grain.min_std == grain.min_std and loaded.subspace is None
    np.testing.assert_array_equal(loaded.grain_scores, scores)
    with pytest.raises(ValueError, match="grain_scores must be"):
        ReferenceSample(sample.embeddings, sample.predictions, None, sample.class_priors, sample.input_stats,
                        grain=grain, grain_scores=scores[:10]).save(tmp_path / "bad")
    _as_another_version(tmp_path / "new" / GRAIN)
    old = ReferenceSample.load(tmp_path / "new")
    assert old.grain is None and old.grain_scores is None and old.input_stats is not None
