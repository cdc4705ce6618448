"""blora.train.loss_history: the per-step loss in a file's metadata, the host's LOSS_MAP, the Load node's summary."""
from __future__ import annotations

import json
import math

from blora.train.loss_history import (FINAL_WINDOW, LOSS_KEY, encode_losses, final_loss, loss_map, losses_in,
                                      training_summary)


def test_losses_round_trip_compactly_at_four_significant_digits():
    losses = [0.123456789, 1e-5 * 3.14159, 12.5, 0.1]
    text = encode_losses(losses)
    assert " " not in text and json.loads(text) == [0.1235, 3.142e-05, 12.5, 0.1]
    back = losses_in({LOSS_KEY: text})
    assert all(math.isclose(a, b, rel_tol=5e-4) for a, b in zip(back, losses)) and len(back) == 4
    assert len(encode_losses([0.0123456] * 1000)) <= 8 * 1000 + 1  # compact: 8 bytes a step at most
    assert losses_in({LOSS_KEY: encode_losses([math.nan, 1.0])})[1] == 1.0
    assert math.isnan(losses_in({LOSS_KEY: encode_losses([math.inf])})[0])


def test_unreadable_or_missing_histories_are_empty():
    for meta in ({}, {LOSS_KEY: ""}, {LOSS_KEY: "not json"}, {LOSS_KEY: '{"a": 1}'}):
        assert losses_in(meta) == [] and training_summary(meta) == ""


def test_loss_map_is_what_the_host_plots_and_the_summary_names_steps_and_final_loss():
    losses = [1.0] * 5 + [0.5] * FINAL_WINDOW
    assert loss_map(losses) == {"loss": losses}
    assert final_loss(losses) == 0.5 and final_loss([0.2, 0.4]) == 0.30000000000000004
    meta = {LOSS_KEY: encode_losses(losses), "blora.steps": "15"}
    assert training_summary(meta) == f"trained 15 steps, final loss 0.5 (mean of last {FINAL_WINDOW})"
