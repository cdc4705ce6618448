"""Strength schedules: parsing, errors naming the entry, interpolation, and the sampling progress of a model call."""
from __future__ import annotations

import pytest

from blora.errors import ScheduleError
from blora.compose.strength_schedule import Keyframe, is_constant, parse_schedule, sampling_progress, strength_at


def test_parse_keyframes_and_constants():
    assert parse_schedule("0:1.0, 0.6:0.3") == (Keyframe(0.0, 1.0), Keyframe(0.6, 0.3))
    assert parse_schedule(" 0.8 ") == (Keyframe(0.0, 0.8),)
    assert parse_schedule("0:0\n0.5:1;1:-0.5,") == (Keyframe(0, 0), Keyframe(0.5, 1), Keyframe(1, -0.5))
    assert is_constant(parse_schedule("0.8")) and is_constant(parse_schedule("0:0.5, 1:0.5"))
    assert not is_constant(parse_schedule("0:1, 1:0"))


@pytest.mark.parametrize("text, fragment", [
    ("", "empty schedule"),
    (" , ", "empty schedule"),
    ("0:1, 0.5:abc", "'0.5:abc': strength 'abc' is not a number"),
    ("0:1, x:0.5", "'x:0.5': progress 'x' is not a number"),
    ("0:1, 1.5:0", "'1.5:0': progress must be between 0 and 1"),
    ("0.6:1, 0.2:0", "'0.2:0': progress 0.2 comes after '0.6:1'"),
    ("0:1:2", "'0:1:2': expected 'progress:strength'"),
    ("0:nan", "'0:nan': strength must be finite"),
    ("0.5, 0.6:1", "'0.5': with several keyframes"),
    ("0:1e9", "'0:1e9': strength 1e\\+09 is outside"),
])
def test_errors_name_the_entry(text, fragment):
    with pytest.raises(ScheduleError, match=f"style_schedule: .*{fragment}" if text.strip(" ,") else fragment):
        parse_schedule(text, name="style_schedule")


def test_strength_is_linear_between_keyframes_and_clamped_outside():
    s = parse_schedule("0.2:1.0, 0.6:0.2")
    assert strength_at(s, 0.0) == 1.0 and strength_at(s, 0.2) == 1.0
    assert strength_at(s, 0.4) == pytest.approx(0.6)
    assert strength_at(s, 0.6) == pytest.approx(0.2) and strength_at(s, 1.0) == pytest.approx(0.2)
    assert strength_at(parse_schedule("0.7"), 0.3) == 0.7


def test_repeated_progress_is_a_jump():
    s = parse_schedule("0:0, 0.5:0, 0.5:1, 1:1")
    assert strength_at(s, 0.49) == 0.0 and strength_at(s, 0.5) == 1.0 and strength_at(s, 0.75) == 1.0


def test_progress_of_each_step_is_i_over_n_minus_1():
    sigmas = [14.6, 7.0, 3.1, 1.2, 0.4, 0.03, 0.0]  # 6 steps
    assert [sampling_progress(s, sigmas) for s in sigmas[:-1]] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_progress_between_sigmas_interpolates_and_clamps():
    sigmas = [10.0, 6.0, 2.0, 0.0]  # 3 steps: progress 0, 0.5, 1
    assert sampling_progress(8.0, sigmas) == pytest.approx(0.25)
    assert sampling_progress(4.0, sigmas) == pytest.approx(0.75)
    assert sampling_progress(1.0, sigmas) == 1.0  # past the last step
    assert sampling_progress(20.0, sigmas) == 0.0  # above the schedule
    assert sampling_progress(3.0, [3.0, 0.0]) == 0.0  # one step
    assert sampling_progress(5.0, [10.0, 5.0, 5.0, 0.0]) == pytest.approx(0.5)  # repeated sigma: first match
