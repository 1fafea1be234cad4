"""Per-prompt statistics, advantage clipping and the RWR weights."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.advantages import (
    PerPromptStatTracker,
    batch_normalize,
    clip_advantages,
    rwr_weights,
    sparse_rwr_weights,
)


def test_tracker_uses_batch_statistics_until_a_prompt_has_min_count() -> None:
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["cat", "cat", "dog", "dog"]
    rewards = np.array([1.0, 3.0, 10.0, 20.0])
    first = tracker.normalize(prompts, rewards)
    np.testing.assert_allclose(first, (rewards - rewards.mean()) / (rewards.std() + 1e-6))
    second = tracker.normalize(["cat", "dog"], np.array([2.0, 30.0]))
    cat = np.array([1.0, 3.0, 2.0])
    dog = np.array([10.0, 20.0, 30.0])
    np.testing.assert_allclose(
        second, [(2.0 - cat.mean()) / (cat.std() + 1e-6), (30.0 - dog.mean()) / (dog.std() + 1e-6)]
    )


def test_tracker_buffer_keeps_only_the_newest_rewards() -> None:
    tracker = PerPromptStatTracker(buffer_size=2, min_count=2)
    tracker.normalize(["cat", "cat"], np.array([100.0, 200.0]))
    out = tracker.normalize(["cat", "cat"], np.array([1.0, 3.0]))  # the buffer is now [1, 3]
    np.testing.assert_allclose(out, [-1.0, 1.0], atol=1e-5)
    assert list(tracker.buffers["cat"]) == [1.0, 3.0]


def test_tracker_state_round_trips_through_json() -> None:
    import json

    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    tracker.normalize(["a", "b", "a"], np.array([1.0, 2.0, 3.0]))
    restored = PerPromptStatTracker(buffer_size=8, min_count=2)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    batch = (["a", "b"], np.array([5.0, 7.0]))
    np.testing.assert_array_equal(tracker.normalize(*batch), restored.normalize(*batch))


def test_tracker_rejects_bad_settings_and_lengths() -> None:
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=2, min_count=3)
    with pytest.raises(ValueError, match="2 prompts but 3 rewards"):
        PerPromptStatTracker(4, 2).normalize(["a", "b"], np.zeros(3))


def test_batch_normalize_and_clipping() -> None:
    advantages = batch_normalize(np.array([0.0, 0.0, 0.0, 100.0]))
    assert abs(advantages.mean()) < 1e-9
    # ε = 1e-8 as ddpo-pytorch's train.py: tiny reward spreads are still normalised to unit spread
    np.testing.assert_allclose(batch_normalize(np.array([0.0, 2e-4])), [-1.0, 1.0], rtol=1e-3)
    np.testing.assert_array_equal(clip_advantages(np.array([-9.0, 0.5, 9.0]), 5.0), [-5.0, 0.5, 5.0])


def test_rwr_weights_are_a_softmax_per_prompt_averaging_one() -> None:
    prompts = ["cat", "cat", "cat", "dog"]
    rewards = np.array([1.0, 2.0, 3.0, -50.0])
    weights = rwr_weights(prompts, rewards, beta=1.0)
    expected_cat = 3 * np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    np.testing.assert_allclose(weights[:3], expected_cat)
    assert weights[3] == pytest.approx(1.0)  # alone in its group
    huge = rwr_weights(["x", "x"], np.array([1000.0, 1001.0]), beta=10.0)  # no overflow
    assert np.isfinite(huge).all()
    assert huge[1] > huge[0]


def test_sparse_rwr_keeps_samples_at_or_above_the_cutoff() -> None:
    rewards = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(sparse_rwr_weights(rewards, threshold=3.0, percentile=None), [0, 0, 2, 2])
    np.testing.assert_array_equal(sparse_rwr_weights(rewards, threshold=None, percentile=75), [0, 0, 0, 4])
    np.testing.assert_array_equal(sparse_rwr_weights(rewards, threshold=9.0, percentile=None), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="exactly one"):
        sparse_rwr_weights(rewards, threshold=1.0, percentile=50)
