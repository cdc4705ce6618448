"""Per-row adapters (the realiser's mechanism for ``Routed`` plan entries: Batch Apply). No host entry point is
called here; ``blora.host.realise`` registers the hooks.

Row r of every UNet call goes through the parts of entry a(r): a routed Linear keeps the base weight and each row
gets its entry's delta, ``y_r = x_r Wᵀ + x_r ΔW_{a(r)}ᵀ (+ Δb_{a(r)})``. Modules whose kind stores ΔW as two factors
(plain LoRA, no DoRA, no bias difference) stay factors, ``x_r ΔWᵀ = s·(x_r A_{a(r)}ᵀ) B_{a(r)}ᵀ`` with the ranks of an
entry's parts concatenated and entries padded to the largest rank with zeros; every other kind the host renders
(LoHa, LoKr, DoRA, full diffs) and every bias difference is rendered by the host's own
``comfy.lora.calculate_weight`` against the model's current weight and routed dense.

The sampler batches CFG as chunks of the latent batch (``transformer_options["cond_or_uncond"]``, one entry per
chunk: [cond rows…, uncond rows…] or one chunk per call when the host runs them separately), so row r is image
``r mod (rows / chunks)``; an image's cond and uncond rows use the same entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from einops import einsum

from ..compose.plan import Static
from ..errors import BLoRAError


@dataclass
class RoutedLinear:
    """The per-entry deltas of one Linear layer, float32 on the CPU (moved on first use).

    factors: down (N, R, in) and up (N, out, R) with scale and strength folded into up; or dense (N, out, in).
    bias: (N, out) bias deltas or None."""

    path: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._cache: dict[tuple, tuple] = {}

    @property
    def num_entries(self) -> int:
        return int((self.down if self.dense is None else self.dense).shape[0])

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = tuple(None if t is None else t.to(device, dtype)
                                     for t in (self.down, self.up, self.dense, self.bias))
        return self._cache[key]

    def delta(self, x: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
        """The rows' output deltas: x (rows, ..., in), entry (rows,) long -> (rows, ..., out)."""
        down, up, dense, bias = self._on(x.device, x.dtype)
        if dense is None:
            hidden = einsum(x, down[entry], "b ... i, b r i -> b ... r")
            out = einsum(hidden, up[entry], "b ... r, b o r -> b ... o")
        else:
            out = einsum(x, dense[entry], "b ... i, b o i -> b ... o")
        if bias is not None:
            rows = bias[entry]
            out = out + rows.reshape(rows.shape[0], *([1] * (out.ndim - 2)), rows.shape[1])
        return out


def rows_to_images(rows: int, transformer_options: dict) -> torch.Tensor:
    """Image index of each row of one UNet call: the host stacks CFG chunks of the whole latent batch
    (``cond_or_uncond`` has one entry per chunk), so row r belongs to image r mod (rows / chunks)."""
    chunks = len(transformer_options.get("cond_or_uncond") or ()) or 1
    per_chunk = rows // chunks if rows % chunks == 0 else rows
    return torch.arange(rows) % per_chunk


def row_entries(x: torch.Tensor, transformer_options: dict, num_entries: int) -> torch.Tensor:
    """Entry of each row of one UNet call (long, on x's device)."""
    return (rows_to_images(x.shape[0], transformer_options) % num_entries).to(x.device)


def adder(routed: RoutedLinear, entry: torch.Tensor):
    def hook(module, inputs, output):
        x = inputs[0]
        if x.shape[0] != entry.shape[0]:
            raise BLoRAError(f"B-LoRA Batch Apply: layer {routed.path} got {x.shape[0]} rows in a call of "
                             f"{entry.shape[0]}; another extension changed the batch inside the model")
        return output + routed.delta(x, entry).to(output.dtype)
    return hook


def low_rank(module):
    """The module's ΔW as factors (up, down) without scale, when its kind stores exactly that and nothing else
    changes the layer (no DoRA magnitude, no bias difference); else None."""
    if module.dora_scale is not None or "diff_b" in module.tensors:
        return None
    return module.spec.low_rank(module.tensors)


def factors(path: str, per_entry: Sequence[Sequence[Static]]) -> RoutedLinear:
    """Each entry's parts as stacked factors (every module ``low_rank``)."""
    downs, ups = [], []
    for parts in per_entry:
        pairs = [(low_rank(p.module), p.strength * p.module.scale) for p in parts]
        downs.append([f.down.float() for f, _ in pairs])
        ups.append([f.up.float() * scale for f, scale in pairs])
    out_f, in_f = next(p.module for parts in per_entry for p in parts).out_in
    rank = max(sum(d.shape[0] for d in ds) for ds in downs)
    down = torch.zeros(len(per_entry), rank, in_f)
    up = torch.zeros(len(per_entry), out_f, rank)
    for e, (ds, us) in enumerate(zip(downs, ups)):
        if ds:
            r = sum(d.shape[0] for d in ds)
            down[e, :r] = torch.cat(ds, 0)
            up[e, :, :r] = torch.cat(us, 1)
    return RoutedLinear(path, down=down, up=up)
