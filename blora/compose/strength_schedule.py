"""Strength schedules over the sampling steps, and the sampling progress a schedule is read at.

Text form: keyframes ``progress:strength`` separated by commas, semicolons or newlines, e.g. ``0:1.0, 0.6:0.3``.
progress is the sampling progress in [0, 1] (0 at the first step, 1 at the last); strengths are linear between
keyframes and held constant before the first and after the last. A single number (``0.8``) is a constant
schedule. Progress values must not decrease; two keyframes at the same progress make a jump (the later one holds
from that progress on).

Sampling progress of a model call (``sampling_progress``): for a run of n steps with sigmas
``σ_0 > σ_1 > … > σ_n`` (the sampler's full schedule, ``σ_n`` usually 0), step i is evaluated at ``σ_i`` and has
progress ``i / (n - 1)``. Samplers that evaluate between two sigmas (Heun, DPM-2, …) get the progress of the
fractional step found by linear interpolation in sigma, clamped to [0, 1].
"""
from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import ScheduleError

_SEPARATORS = re.compile(r"[,;\n]")
STRENGTH_LIMIT = 100.0


@dataclass(frozen=True)
class Keyframe:
    """The strength in force at one sampling progress (0 = first step, 1 = last step)."""

    progress: float
    strength: float


Schedule = tuple[Keyframe, ...]


def _number(text: str, what: str, entry: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScheduleError(f"{name}: entry {entry!r}: {what} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ScheduleError(f"{name}: entry {entry!r}: {what} must be finite, got {text.strip()!r}")
    return value


def _keyframe(entry: str, name: str) -> Keyframe:
    parts = entry.split(":")
    if len(parts) == 1:
        return Keyframe(0.0, _number(parts[0], "strength", entry, name))
    if len(parts) != 2:
        raise ScheduleError(f"{name}: entry {entry!r}: expected 'progress:strength', e.g. '0.6:0.3'")
    progress = _number(parts[0], "progress", entry, name)
    if not 0.0 <= progress <= 1.0:
        raise ScheduleError(f"{name}: entry {entry!r}: progress must be between 0 and 1, got {progress:g}")
    return Keyframe(progress, _number(parts[1], "strength", entry, name))


def parse_schedule(text: str, name: str = "schedule") -> Schedule:
    """Keyframes of a schedule text (see the module doc). Raises ScheduleError naming ``name`` and the bad entry."""
    entries = [e.strip() for e in _SEPARATORS.split(text or "") if e.strip()]
    if not entries:
        raise ScheduleError(f"{name}: empty schedule; give a strength ('1.0') or keyframes ('0:1.0, 0.6:0.3')")
    keyframes = tuple(_keyframe(e, name) for e in entries)
    if len(keyframes) > 1 and any(":" not in e for e in entries):
        bare = next(e for e in entries if ":" not in e)
        raise ScheduleError(f"{name}: entry {bare!r}: with several keyframes each needs 'progress:strength'")
    for entry, kf in zip(entries, keyframes):
        if abs(kf.strength) > STRENGTH_LIMIT:
            raise ScheduleError(f"{name}: entry {entry!r}: strength {kf.strength:g} is outside "
                                f"[-{STRENGTH_LIMIT:g}, {STRENGTH_LIMIT:g}]")
    for (prev_entry, prev), (entry, kf) in zip(zip(entries, keyframes), zip(entries[1:], keyframes[1:])):
        if kf.progress < prev.progress:
            raise ScheduleError(f"{name}: entry {entry!r}: progress {kf.progress:g} comes after {prev_entry!r}; "
                                f"keyframes must be in increasing progress")
    return keyframes


def is_constant(schedule: Schedule) -> bool:
    """True when every keyframe has the same strength (the schedule is one number)."""
    return len({kf.strength for kf in schedule}) == 1


def strength_at(schedule: Schedule, progress: float) -> float:
    """The strength in force at ``progress``: linear between keyframes, clamped outside them."""
    points = [kf.progress for kf in schedule]
    i = bisect.bisect_right(points, progress)
    if i == 0:
        return schedule[0].strength
    if i == len(schedule):
        return schedule[-1].strength
    a, b = schedule[i - 1], schedule[i]  # a.progress <= progress < b.progress
    w = (progress - a.progress) / (b.progress - a.progress)
    return a.strength + w * (b.strength - a.strength)


def sampling_progress(sigma: float, sigmas: Sequence[float]) -> float:
    """Progress in [0, 1] of a model call at noise level ``sigma`` in a run with the sigma schedule ``sigmas``
    (n + 1 values for n steps). Step i (at ``sigmas[i]``) has progress i / (n - 1); sigmas between two schedule
    entries interpolate linearly; a one-step run is at progress 0."""
    steps = len(sigmas) - 1
    if steps <= 1:
        return 0.0
    for i in range(steps):
        hi, lo = sigmas[i], sigmas[i + 1]
        if min(hi, lo) <= sigma <= max(hi, lo):
            frac = 0.0 if hi == lo else (hi - sigma) / (hi - lo)
            return min(1.0, max(0.0, (i + frac) / (steps - 1)))
    return 0.0 if sigma > sigmas[0] else 1.0
