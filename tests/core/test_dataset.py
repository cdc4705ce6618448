"""blora.train.augment and blora.train.dataset: kornia resize/flip/crop/jitter, folders of captioned images,
training views and aspect-ratio buckets (torch only)."""
from __future__ import annotations

import os

import pytest
import torch

from blora.errors import BLoRAError, UnsafePathError
from blora.train.augment import color_jitter, random_crop_box, resize
from blora.train.dataset import (AUGMENTED_VIEWS, MIN_CROP_AREA, TrainingSet, bucket_groups, folder_images,
                                 sample_bucketed_batch, subfolder, training_views)
from blora.train.recipe import sample_batch


def ramp(h: int, w: int) -> torch.Tensor:
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    return torch.stack([x, y, (x + y) / 2], -1).contiguous()


def test_resize_is_antialiased_and_keeps_an_image_of_the_size_asked():
    stripes = torch.zeros(64, 64, 3)
    stripes[:, ::2] = 1.0  # one-pixel stripes: aliasing would keep only one colour
    small = resize(stripes, (16, 16))
    assert small.shape == (16, 16, 3) and torch.allclose(small, torch.full_like(small, 0.5), atol=0.05)
    img = ramp(8, 12)
    assert resize(img, (8, 12)) is img


def test_random_crop_keeps_aspect_and_area_and_jitter_changes_colour_only_when_asked():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        box = random_crop_box(300, 200, MIN_CROP_AREA, g)
        assert 0 <= box.top <= 300 - box.height and 0 <= box.left <= 200 - box.width
        assert box.height * box.width >= MIN_CROP_AREA * 300 * 200 * 0.98
        assert box.height / box.width == pytest.approx(1.5, rel=0.02)
    img = ramp(16, 16)
    assert color_jitter(img, 0.0, g) is img
    a = color_jitter(img, 0.3, torch.Generator().manual_seed(1))
    b = color_jitter(img, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, img, atol=1e-3) and 0 <= float(a.min()) <= float(a.max()) <= 1


def write_folder(root, files: dict[str, str | None]):
    from PIL import Image

    for name, caption in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


def test_folder_images_pairs_captions_reads_kohya_repeats_and_refuses_links_out(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "set"
    write_folder(root, {"b.png": "a [v] dog", "a.JPG": None, "3_extra/c.webp": "close-up", "notes/d.png": ""})
    (root / "readme.md").write_text("not an image")
    items = folder_images(root, "A [v]")
    assert [(p.path.name, p.caption, p.repeats) for p in items] == [
        ("c.webp", "close-up", 3), ("a.JPG", "A [v]", 1), ("b.png", "a [v] dog", 1), ("d.png", "A [v]", 1)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BLoRAError, match="empty: no images"):
        folder_images(tmp_path / "empty")
    outside = tmp_path / "outside.png"
    write_folder(tmp_path, {"outside.png": None})
    os.symlink(outside, root / "link.png")
    with pytest.raises(UnsafePathError, match="outside the training folder"):
        folder_images(root)


def test_views_keep_aspect_without_crop_and_augmentations_make_repeatable_views():
    images = [ramp(100, 150)[None], ramp(90, 60)[None]]
    views = training_views(images, 64)
    assert [tuple(v.image.shape[:2]) for v in views] == [(64, 96), (96, 64)]
    assert [v.original_size for v in views] == [(100, 150), (90, 60)] and all(v.crop_top_left == (0, 0)
                                                                               for v in views)
    bucketed = training_views(images + [ramp(64, 100)[None]], 64, batch_size=2)
    assert [tuple(v.image.shape[:2]) for v in bucketed] == [(64, 64 * 2), (64 * 2, 64), (64, 64 * 2)]
    aug = training_views(images, 64, random_crop=True, color_jitter_strength=0.2, seed=3)
    again = training_views(images, 64, random_crop=True, color_jitter_strength=0.2, seed=3)
    assert len(aug) == 2 * AUGMENTED_VIEWS and [v.index for v in aug] == [0] * 4 + [1] * 4
    assert all(torch.equal(a.image, b.image) for a, b in zip(aug, again))
    assert all(tuple(v.image.shape[:2]) == (64, 96) for v in aug[:4])
    assert any(v.crop_top_left != (0, 0) for v in aug)
    assert not torch.equal(aug[0].image, aug[1].image)


def test_batches_come_from_one_bucket_and_one_bucket_draws_as_before():
    groups = bucket_groups([(64, 96), (96, 64), (64, 96), (64, 96)])
    assert groups == [[0, 2, 3], [1]]
    for seed in range(30):
        batch = sample_bucketed_batch(groups, 2, torch.Generator().manual_seed(seed))
        assert len(batch) == 2 and (set(batch) <= {0, 2, 3} or set(batch) == {1})
    one = bucket_groups([(64, 64)] * 5)
    for seed in range(5):
        assert sample_bucketed_batch(one, 3, torch.Generator().manual_seed(seed)) == \
            sample_batch(5, 3, torch.Generator().manual_seed(seed))


def test_a_training_set_needs_one_conditioning_per_image():
    with pytest.raises(BLoRAError, match="2 images but 1 conditionings"):
        TrainingSet([torch.zeros(1, 8, 8, 3)] * 2, [[torch.zeros(1), {}]], ["a", "b"])
    with pytest.raises(BLoRAError, match="no images"):
        TrainingSet([], [], [])


def test_subfolder_stays_inside_its_root(tmp_path):
    root = tmp_path / "input"
    (root / "cats").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link_out").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert subfolder(root, "cats") == (root / "cats").resolve()
    for name, message in [("..", "leads outside"), ("../outside", "leads outside"), (str(tmp_path / "outside"),
                          "leads outside"), ("link_out", "leads outside"), ("", "not a subfolder"),
                          (".", "not a subfolder")]:
        with pytest.raises(UnsafePathError, match=message):
            subfolder(root, name)
