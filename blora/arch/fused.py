"""Split layers onto a host's fused layers and back (FLUX: diffusers' to_q/to_k/to_v[/proj_mlp] <-> the host's
``img_attn.qkv`` / ``txt_attn.qkv`` / ``linear1``), exactly.

Fusing (reading a diffusers/PEFT/ai-toolkit file): the fused delta is the pieces' deltas stacked by rows, zero rows
for a piece the file does not hold.
- LoRA pieces that share one ``down`` and one scale (a fused LoRA written split, as kohya -> diffusers gives): one
  LoRA of that rank, ``up`` the stacked ups: the original tensors exactly.
- Other LoRA pieces: one LoRA of rank Σr, ``down`` the stacked downs and ``up`` block-diagonal: ΔW exactly (rank
  grows; with unequal scales each piece's scale is multiplied into its up block, one rounding in the file's dtype
  when that is below float32).
- LoHa, LoKr, LoCon-Tucker pieces: no LoHa/LoKr of the fused layer equals them, so they become one full-rank diff
  (``full``): ΔW exactly (float32), but a full-size tensor.
- DoRA pieces are refused: per-row DoRA of missing rows needs the base weight.
Splitting (writing diffusers names): each piece gets its rows of ``up`` with the shared ``down`` (rank r each),
except that a block-diagonal LoRA (what fusing split pieces gives) is cut back into its blocks: the pieces' own
tensors. ΔW exactly either way. A fused LoHa/LoKr or DoRA module cannot be written split (refused, naming it).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import torch

from ..errors import BLoRAError
from ..adapters.kinds import ModuleAdapter, delta_weight
from ..adapters.kinds.full import Full
from ..adapters.kinds.lora import LoRA
from . import Piece

BIAS = "diff_b"


def _plain_lora(m: ModuleAdapter) -> bool:
    return m.kind == LoRA.name and "mid" not in m.tensors and m.tensors["down"].ndim == 2


def _in_features(pieces: Mapping[int, ModuleAdapter], where: str) -> int:
    ins = {m.out_in[1] for m in pieces.values()}
    if len(ins) != 1:
        raise BLoRAError(f"{where}: the split parts have different input widths {sorted(ins)}")
    return ins.pop()


def fuse(pieces: Mapping[int, ModuleAdapter], layout: Piece, where: str) -> ModuleAdapter:
    """One module of the fused host layer from its pieces (part index -> module); see the module docstring."""
    if any(m.dora_scale is not None for m in pieces.values()):
        raise BLoRAError(f"{where}: DoRA on split q/k/v layers cannot be put on the host's fused layer exactly "
                         f"(the rows the file does not adapt would need the base weight); not supported")
    in_features = _in_features(pieces, where)
    total = layout.total(in_features)
    rows = {i: Piece(layout.layout, i, layout.sizes).rows(in_features) for i in range(len(layout.sizes))}
    for i, m in pieces.items():
        start, stop = rows[i]
        if m.out_in[0] != stop - start:
            raise BLoRAError(f"{where}: part {i} has {m.out_in[0]} output rows, a {layout.layout} layer with "
                             f"{in_features} inputs has {stop - start} there")
    order = sorted(pieces)
    bias = _fused_bias(pieces, rows, total)
    if all(_plain_lora(m) for m in pieces.values()):
        return _fuse_lora([pieces[i] for i in order], [rows[i] for i in order], total, bias)
    diff = torch.zeros(total, in_features, dtype=torch.float32)
    for i in order:
        diff[rows[i][0]:rows[i][1]] = delta_weight(pieces[i])
    return ModuleAdapter(Full.name, {"diff": diff, **bias})


def _fused_bias(pieces: Mapping[int, ModuleAdapter], rows: Mapping[int, tuple[int, int]],
                total: int) -> dict[str, torch.Tensor]:
    held = {i: m.tensors[BIAS] for i, m in pieces.items() if BIAS in m.tensors}
    if not held:
        return {}
    first = next(iter(held.values()))
    out = torch.zeros(total, dtype=first.dtype)
    for i, b in held.items():
        out[rows[i][0]:rows[i][1]] = b
    return {BIAS: out}


def _fuse_lora(mods: Sequence[ModuleAdapter], rows: Sequence[tuple[int, int]], total: int,
               bias: Mapping[str, torch.Tensor]) -> ModuleAdapter:
    downs = [m.tensors["down"] for m in mods]
    ups = [m.tensors["up"] for m in mods]
    dtype = ups[0].dtype
    scales = {m.scale for m in mods}
    shared = len(scales) == 1 and all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs[1:]) \
        and len({m.alpha for m in mods}) == 1
    if shared:
        up = torch.zeros(total, downs[0].shape[0], dtype=dtype)
        for (start, stop), u in zip(rows, ups):
            up[start:stop] = u
        return ModuleAdapter(LoRA.name, {"down": downs[0], "up": up, **bias}, mods[0].alpha)
    rank = sum(d.shape[0] for d in downs)
    up = torch.zeros(total, rank, dtype=dtype)
    col = 0
    one_scale = len(scales) == 1
    for (start, stop), m in zip(rows, mods):
        r = m.rank
        u = m.tensors["up"] if one_scale else (m.tensors["up"].float() * m.scale).to(dtype)
        up[start:stop, col:col + r] = u
        col += r
    down = torch.cat([d.to(downs[0].dtype) for d in downs], 0)
    if one_scale and all(m.alpha is not None for m in mods):
        alpha = next(iter(scales)) * rank  # the pieces' common scale alpha_i / r_i, as alpha / Σr
    elif one_scale and all(m.alpha is None for m in mods):
        alpha = None
    else:
        alpha = None  # scales folded into the up blocks: scale 1
        if one_scale:
            up = (up.float() * next(iter(scales))).to(dtype)
    return ModuleAdapter(LoRA.name, {"down": down, "up": up, **bias}, alpha)


def split(module: ModuleAdapter, names: Sequence[tuple[str, Piece]], where: str) -> list[tuple[str, ModuleAdapter]]:
    """The pieces of a fused-layer module under their split names; see the module docstring. A piece whose rows
    are all zero in a block-diagonal LoRA (a part the original file did not hold) is left out."""
    if module.dora_scale is not None:
        raise BLoRAError(f"{where}: a DoRA module of a fused layer cannot be written as split q/k/v layers exactly; "
                         f"write it with host names (kohya, comfy)")
    if not _plain_lora(module):
        if module.kind != Full.name:
            raise BLoRAError(f"{where}: a {module.spec.label} module of a fused layer has no exact split into "
                             f"q/k/v {module.spec.label} modules; write it with host names (kohya, comfy, lycoris)")
        return _split_full(module, names, where)
    down, up = module.tensors["down"], module.tensors["up"]
    in_features = down.shape[1]
    layout = names[0][1]
    if up.shape[0] != layout.total(in_features):
        raise BLoRAError(f"{where}: has {up.shape[0]} output rows, a {layout.layout} layer with {in_features} inputs "
                         f"has {layout.total(in_features)}")
    cuts = [p.rows(in_features) for _, p in names]
    masks = [(up[a:b] != 0).any(0) for a, b in cuts]
    block = all(not (masks[i] & masks[j]).any() for i in range(len(masks)) for j in range(i + 1, len(masks))) \
        and bool(torch.stack(masks).any(0).all())
    out = []
    for (name, _), (a, b), mask in zip(names, cuts, masks):
        tensors = {"down": down, "up": up[a:b]}
        alpha = module.alpha
        if block:
            if not mask.any():
                continue
            tensors = {"down": down[mask], "up": up[a:b][:, mask]}
            alpha = None if module.alpha is None else module.scale * int(mask.sum())
        if BIAS in module.tensors:
            tensors[BIAS] = module.tensors[BIAS][a:b]
        out.append((name, ModuleAdapter(LoRA.name, {k: v.contiguous() for k, v in tensors.items()}, alpha)))
    return out


def _split_full(module: ModuleAdapter, names: Sequence[tuple[str, Piece]], where: str):
    diff = module.tensors["diff"]
    in_features = diff.shape[1]
    out = []
    for name, piece in names:
        a, b = piece.rows(in_features)
        tensors = {"diff": diff[a:b].contiguous()}
        if BIAS in module.tensors:
            tensors[BIAS] = module.tensors[BIAS][a:b]
        out.append((name, replace(module, tensors=tensors)))
    return out
