"""Validation previews, the core half: when rows are sampled, which layers each view keeps, prompts, layout."""
from __future__ import annotations

import pytest
import torch

from blora.errors import BLoRAError
from blora.train.previews import (ValidationSettings, is_preview_step, preview_grid, preview_row, preview_steps,
                                  view_multipliers)

PATHS = ["input_blocks.8.1.transformer_blocks.0.attn1.to_q", "output_blocks.0.1.transformer_blocks.0.attn1.to_q",
         "output_blocks.0.1.transformer_blocks.1.attn2.to_k", "output_blocks.1.1.transformer_blocks.0.attn2.to_v",
         "output_blocks.2.1.transformer_blocks.0.attn1.to_q"]


@pytest.mark.parametrize("total, every, steps", [(1000, 100, [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]),
                                                 (10, 4, [0, 4, 8, 10]), (10, 0, [0, 10]), (3, 5, [0, 3]),
                                                 (4, 2, [0, 2, 4])])
def test_rows_at_start_every_n_and_end(total, every, steps):
    assert preview_steps(total, every) == steps
    assert [d for d in range(total + 1) if is_preview_step(d, total, every)] == steps


def test_views_keep_only_their_roles_layers():
    assert list(view_multipliers(PATHS, "content").values()) == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert list(view_multipliers(PATHS, "style").values()) == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert list(view_multipliers(PATHS, "both").values()) == [1.0] * 5
    with pytest.raises(BLoRAError, match="unknown preview view 'layout'"):
        view_multipliers(PATHS, "layout")


def test_prompts_put_the_trigger_in_place_of_v_and_s():
    s = ValidationSettings(trigger="sks")
    assert [s.prompt(v) for v in ("content", "style", "both")] == ["A sks", "A bird in sks style", "A sks in sks style"]
    assert ValidationSettings().prompt("both") == "A [v] in [v] style"
    assert ValidationSettings(width=1216, height=832).latent_size == (104, 152)


@pytest.mark.parametrize("field, value, message", [("every", -1, "`every`"), ("steps", 0, "`steps`"),
                                                   ("cfg", 0.0, "`cfg`"), ("width", 100, "`width`"),
                                                   ("height", 32, "`height`"), ("seed", -1, "`seed`")])
def test_bad_settings_are_named(field, value, message):
    with pytest.raises(BLoRAError, match=message):
        ValidationSettings(**{field: value})


def test_rows_side_by_side_and_grid_top_to_bottom():
    views = [torch.full((1, 4, 5, 3), v) for v in (0.1, 0.5, 2.0)]
    row = preview_row(views)
    assert row.shape == (1, 4, 15, 3)
    assert torch.equal(row[0, :, 5:10], views[1][0]) and float(row.max()) == 1.0  # clamped to [0, 1]
    grid = preview_grid([row, torch.zeros_like(row)])
    assert grid.shape == (1, 8, 15, 3) and torch.equal(grid[0, :4], row[0]) and float(grid[0, 4:].max()) == 0.0
    with pytest.raises(BLoRAError):
        preview_grid([])
