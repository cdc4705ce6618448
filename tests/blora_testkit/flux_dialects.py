"""FLUX.1 LoRA state dicts in the dialects found in the wild, built independently of ``blora.formats.keys`` and
``blora.arch`` (own naming tables, written from the host's ``comfy/ldm/flux/layers.py`` and diffusers'
``FluxTransformer2DModel``), with the ΔW each should give every host layer.

    shapes = flux_shapes(hidden=32)                      # host path -> (out, in) of every block Linear
    sd, deltas = make_flux_state_dict("peft", shapes, rank=4, seed=0)

Dialects (the key of one layer):
  kohya        lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight (+ .alpha)         sd-scripts
  comfy        diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight (+ .alpha)   ComfyUI
  peft         transformer.transformer_blocks.0.attn.to_q.lora_A.weight                   diffusers / PEFT / ai-toolkit
  diffsynth    transformer_blocks.0.attn.to_q.lora_A.default.weight                       bare diffusers names
  onetrainer   lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight (+ .alpha)
  lycoris      lora_unet_double_blocks_0_img_attn_qkv.lokr_w1 / lokr_w2                   LyCORIS LoKr, host names
  lycoris_loha lora_unet_…hada_w1_a … (+ .alpha)                                          LyCORIS LoHa, host names
  simpletuner  lycoris_transformer_blocks_0_attn_to_q.lokr_w1 / lokr_w2                   LyCORIS LoKr, diffusers names
Split dialects (peft, diffsynth, onetrainer, simpletuner) give each of q, k, v (and proj_mlp) its own factors; the
expected ΔW of the fused host layer stacks them by rows, zeros for a part ``skip`` leaves out.
"""
from __future__ import annotations

from typing import Mapping

import torch

DOUBLE = {  # host name in a double block -> (diffusers names of its row parts, in row order)
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
          "modulation.lin": ("norm.linear",)}
SPLIT = ("peft", "diffsynth", "onetrainer", "simpletuner")
HOST_NAMED = ("kohya", "comfy", "lycoris", "lycoris_loha")
ALPHA = ("kohya", "comfy", "onetrainer", "lycoris_loha")


def flux_shapes(hidden: int = 32, mlp_ratio: int = 4, double: int = 2, single: int = 2,
                inner: tuple[str, ...] | None = None) -> dict[str, tuple[int, int]]:
    """host path -> (out, in) of the block Linears of a FLUX.1-layout model (``inner``: only these names)."""
    mlp = hidden * mlp_ratio
    d = {"img_attn.qkv": (3 * hidden, hidden), "txt_attn.qkv": (3 * hidden, hidden),
         "img_attn.proj": (hidden, hidden), "txt_attn.proj": (hidden, hidden),
         "img_mlp.0": (mlp, hidden), "img_mlp.2": (hidden, mlp), "txt_mlp.0": (mlp, hidden), "txt_mlp.2": (hidden, mlp),
         "img_mod.lin": (6 * hidden, hidden), "txt_mod.lin": (6 * hidden, hidden)}
    s = {"linear1": (3 * hidden + mlp, hidden), "linear2": (hidden, hidden + mlp), "modulation.lin": (3 * hidden, hidden)}
    out = {}
    for n in range(double):
        out.update({f"double_blocks.{n}.{k}": v for k, v in d.items() if inner is None or k in inner})
    for n in range(single):
        out.update({f"single_blocks.{n}.{k}": v for k, v in s.items() if inner is None or k in inner})
    return out


def parts_of(path: str, shape: tuple[int, int]) -> list[tuple[str, int, int]]:
    """(diffusers name, first row, row count) of each split part of a host layer."""
    kind, n, inner = path.split(".", 2)
    names = (DOUBLE if kind == "double_blocks" else SINGLE)[inner]
    prefix = ("transformer_blocks." if kind == "double_blocks" else "single_transformer_blocks.") + n + "."
    out, hidden = shape[0], shape[1]
    sizes = [hidden] * 3 + [out - 3 * hidden] if len(names) == 4 else [hidden] * 3 if len(names) == 3 else [out]
    rows, start = [], 0
    for name, size in zip(names, sizes):
        rows.append((prefix + name, start, size))
        start += size
    return rows


def _lora_keys(dialect: str, name: str) -> tuple[str, str, str | None]:
    under = name.replace(".", "_")
    return {
        "kohya": (f"lora_unet_{under}.lora_down.weight", f"lora_unet_{under}.lora_up.weight", f"lora_unet_{under}.alpha"),
        "comfy": (f"diffusion_model.{name}.lora_down.weight", f"diffusion_model.{name}.lora_up.weight",
                  f"diffusion_model.{name}.alpha"),
        "peft": (f"transformer.{name}.lora_A.weight", f"transformer.{name}.lora_B.weight", None),
        "diffsynth": (f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight", None),
        "onetrainer": (f"lora_transformer_{under}.lora_down.weight", f"lora_transformer_{under}.lora_up.weight",
                       f"lora_transformer_{under}.alpha"),
    }[dialect]


def make_flux_state_dict(dialect: str, shapes: Mapping[str, tuple[int, int]], rank: int, seed: int,
                         alpha: float | None = None, skip: tuple[str, ...] = ()
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state dict, host path -> expected ΔW float32) of a random adapter on every layer of ``shapes``.

    skip: diffusers part names (``attn.to_v``, ``proj_mlp``) a split dialect leaves out (zero rows in ΔW)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for path, (out, inp) in shapes.items():
        delta = torch.zeros(out, inp)
        units = ([(path, 0, out)] if dialect in HOST_NAMED else
                 [(n, a, c) for n, a, c in parts_of(path, (out, inp)) if not n.endswith(tuple("." + s for s in skip))])
        for name, start, rows in units:
            if dialect in ("lycoris", "simpletuner"):
                w1 = torch.randn(2, 2, generator=g)
                w2 = torch.randn(rows // 2, inp // 2, generator=g) * 0.1
                key = f"lora_unet_{name.replace('.', '_')}" if dialect == "lycoris" else f"lycoris_{name.replace('.', '_')}"
                sd[key + ".lokr_w1"], sd[key + ".lokr_w2"] = w1, w2
                delta[start:start + rows] = torch.kron(w1, w2)
                continue
            if dialect == "lycoris_loha":
                key = f"lora_unet_{name.replace('.', '_')}"
                w = [torch.randn(*s, generator=g) * 0.3 for s in ((rows, rank), (rank, inp), (rows, rank), (rank, inp))]
                sd.update(zip((key + ".hada_w1_a", key + ".hada_w1_b", key + ".hada_w2_a", key + ".hada_w2_b"), w))
                a = float(rank) if alpha is None else alpha
                sd[key + ".alpha"] = torch.tensor(a)
                delta[start:start + rows] = (w[0] @ w[1]) * (w[2] @ w[3]) * (a / rank)
                continue
            down = torch.randn(rank, inp, generator=g) / rank
            up = torch.randn(rows, rank, generator=g) * 0.2
            dkey, ukey, akey = _lora_keys(dialect, name)
            scale = 1.0 if alpha is None else alpha / rank
            if akey is None:
                up = up * scale
                scale = 1.0
            else:
                sd[akey] = torch.tensor(float(rank) if alpha is None else alpha)
            sd[dkey], sd[ukey] = down, up
            delta[start:start + rows] = (up @ down) * scale
        deltas[path] = delta
    return sd, deltas
