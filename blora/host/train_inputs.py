"""What the loop trains on, made once before it starts: latents of each training view (``blora.train.dataset``: one per
image, or several augmented views; VAE-encoded once, flipped copies when flip augmentation is on), per-image
cross-attention context and SDXL vector conditioning (pooled text + size conditioning: original size, crop corner,
training size), and the model's schedule and prediction type."""
from __future__ import annotations

from dataclasses import dataclass

import comfy.conds
import comfy.model_sampling
import torch

from ..errors import ArchitectureError, BLoRAError
from ..train.dataset import bucket_groups, training_views
from ..train.recipe import PREDICTION_TARGETS

# Checked in order (subclasses first): the model_sampling mixin decides what the model predicts.
PREDICTION_KINDS: tuple[tuple[type, str], ...] = (
    (comfy.model_sampling.EDM, "EDM"), (comfy.model_sampling.X0, "X0"),
    (comfy.model_sampling.V_PREDICTION, "V_PREDICTION"), (comfy.model_sampling.EPS, "EPS"),
)


@dataclass
class Sample:
    """One training image: x0 (1, C, h, w) in the model's latent space (flipped: mirrored copy or None),
    context (1, T, D) and y (1, adm) as the UNet takes them. Ordinary tensors on the load device."""

    x0: torch.Tensor
    x0_flipped: torch.Tensor | None
    context: torch.Tensor
    y: torch.Tensor

    @property
    def latent_size(self) -> tuple[int, int]:
        return int(self.x0.shape[-2]), int(self.x0.shape[-1])


@dataclass(frozen=True)
class NoiseSchedule:
    """The model's own noise schedule (its ``model_sampling``, object patches included), what it predicts
    (EPS, V_PREDICTION), and its sigma per integer timestep (num_timesteps,) float32 on the CPU."""

    model_sampling: torch.nn.Module
    prediction: str
    sigmas: torch.Tensor


def prediction_kind(model_sampling) -> str:
    for cls, name in PREDICTION_KINDS:
        if isinstance(model_sampling, cls):
            return name
    return type(model_sampling).__name__


def noise_schedule(model) -> NoiseSchedule:
    """The schedule training draws from. Refuses prediction types other than PREDICTION_TARGETS and continuous
    schedules (ArchitectureError)."""
    ms = model.get_model_object("model_sampling")
    prediction = prediction_kind(ms)
    if prediction not in PREDICTION_TARGETS:
        raise ArchitectureError(f"cannot train a {prediction}-prediction model: B-LoRA training supports "
                                f"{', '.join(PREDICTION_TARGETS)}")
    sigmas = getattr(ms, "sigmas", None)
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) or sigmas is None:
        raise ArchitectureError(f"cannot train on a {type(ms).__name__} schedule: B-LoRA training draws integer "
                                f"timesteps from a discrete (SDXL-style) schedule")
    return NoiseSchedule(ms, prediction, sigmas.detach().float().cpu().clone())


def _conditioning_rows(positive, count: int) -> list[tuple[torch.Tensor, dict]]:
    """(context (1, T, D), extras) per image from CONDITIONING: one entry for all, one entry per image, or one
    entry whose batch holds one row per image."""
    if not positive:
        raise BLoRAError("positive: empty conditioning; connect a text encode")
    if len(positive) == count:
        entries = [(c, e, 0) for c, e in positive]
    elif len(positive) == 1 and positive[0][0].shape[0] == count:
        entries = [(positive[0][0], positive[0][1], i) for i in range(count)]
    elif len(positive) == 1:
        entries = [(positive[0][0], positive[0][1], 0)] * count
    else:
        raise BLoRAError(f"positive: {len(positive)} conditionings for {count} images; give one for all images "
                         f"or one per image")
    rows = []
    for i, (context, extras, row) in enumerate(entries):
        pooled = extras.get("pooled_output")
        if pooled is None:
            raise ArchitectureError(f"positive (image {i}): no pooled_output; SDXL training needs conditioning "
                                    f"from an SDXL text encoder (CLIPTextEncode with an SDXL CLIP)")
        row_extras = dict(extras, pooled_output=pooled[min(row, pooled.shape[0] - 1):][:1])
        rows.append((context[row:row + 1], row_extras))
    return rows


def _model_conds(base_model, context, extras, original, target, device, latent,
                 crop_top_left=(0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """context and y through the model's own extra_conds (SDXL: pooled + original/crop/target size)."""
    (oh, ow), (th, tw), (top, left) = original, target, crop_top_left
    params = dict(extras, cross_attn=context, device=device, noise=latent, width=ow, height=oh, crop_w=left,
                  crop_h=top, target_width=tw, target_height=th)
    out = base_model.extra_conds(**params)
    if "y" not in out:
        raise ArchitectureError(f"{type(base_model).__name__} takes no vector conditioning: not an SDXL model")
    cross = out.get("c_crossattn", comfy.conds.CONDCrossAttn(context))
    return cross.cond, out["y"].cond


def _encode(vae, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(image.unsqueeze(0)).float()


def prepare_samples(model, vae, images, positive, resolution: int, flip: bool, *, batch_size: int = 1,
                    random_crop: bool = False, color_jitter: float = 0.0, seed: int = 0) -> list[Sample]:
    """Resize (and augment), encode (once) and condition each training view (``blora.train.dataset.training_views``).
    Everything returned is an ordinary tensor (made outside inference mode) on the model's load device, in
    float32."""
    views = training_views(images, resolution, batch_size=batch_size, random_crop=random_crop,
                           color_jitter_strength=color_jitter, seed=seed)
    rows = _conditioning_rows(positive, 1 + max(v.index for v in views))
    base, device = model.model, model.load_device
    samples = []
    for view in views:
        context, extras = rows[view.index]
        image = view.image
        latent = _encode(vae, image)
        flipped = _encode(vae, torch.flip(image, dims=[1])) if flip else None
        target = (int(image.shape[0]), int(image.shape[1]))
        ctx, y = _model_conds(base, context, extras, view.original_size, target, device, latent, view.crop_top_left)
        x0 = base.process_latent_in(latent)
        x0_flipped = None if flipped is None else base.process_latent_in(flipped)
        samples.append(Sample(*(_owned(t, device) for t in (x0, x0_flipped, ctx, y))))
    return samples


def _owned(t: torch.Tensor | None, device) -> torch.Tensor | None:
    """An ordinary float32 copy on ``device`` (autograd may save it; an inference tensor it may not)."""
    if t is None:
        return None
    with torch.inference_mode(False):
        return t.detach().to(device, torch.float32).clone()


def buckets(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Sample indices that may share a micro-batch: all of them at batch size 1, else those of one latent size."""
    if batch_size == 1:
        return [list(range(len(samples)))]
    return bucket_groups([s.latent_size for s in samples])


def batch_of(samples: list[Sample], indices: list[int], flips: list[bool]) -> tuple[torch.Tensor, ...]:
    """x0 (B, C, h, w), context (B, T, D), y (B, adm) for the chosen images (context lengths padded by repeat, as
    the host batches conditionings)."""
    x0 = torch.cat([samples[i].x0_flipped if f else samples[i].x0 for i, f in zip(indices, flips)])
    crossed = [comfy.conds.CONDCrossAttn(samples[i].context) for i in indices]
    context = crossed[0].concat(crossed[1:]) if len(crossed) > 1 else crossed[0].cond
    y = torch.cat([samples[i].y for i in indices])
    return x0, context, y
