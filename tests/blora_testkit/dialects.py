"""Adapter state dicts in every key dialect, built independently of ``blora.formats.keys`` (own naming code, from
the index rule in shared/reference/blora.md §1), plus the expected weight deltas, for reader/writer tests.

    make_state_dict("kohya", TINY_ATTN_SHAPES, rank=4, seed=0, alpha=2.0)
    reference_deltas(TINY_ATTN_SHAPES, rank=4, seed=0, alpha=2.0)   # canonical path -> ΔW (float32)

File dialects: diffusers, diffusers_doubled, peft, peft_base_model (``base_model.model.`` prefix), kohya,
kohya_diffusers, comfy, lycoris (kohya names; kind loha / lokr / lora). Dialects without alpha get alpha/rank
folded into ``up`` so every dialect holds the same ΔW. DoRA: ``dora_scale`` (1, in) (input axis, what stock ComfyUI
renders exactly) for kohya/comfy/lycoris names, ``lora_magnitude_vector`` (out,) for PEFT.
"""
from __future__ import annotations

from typing import Mapping

import torch

BLOCK_LDM = ("input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1",
             "output_blocks.0.1", "output_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1", "output_blocks.4.1",
             "output_blocks.5.1")
CONTENT, STYLE, LAYOUT = "output_blocks.0.1", "output_blocks.1.1", "input_blocks.8.1"
_WIDE = ("input_blocks.7.1", "input_blocks.8.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1",
         "output_blocks.2.1")
TINY_WIDTH = {b: 128 if b in _WIDE else 64 for b in BLOCK_LDM}
TINY_DEPTH = {b: 1 for b in BLOCK_LDM}
TINY_CONTEXT = 64
FULL_WIDTH = {b: 1280 if b in _WIDE else 640 for b in BLOCK_LDM}
FULL_DEPTH = {b: 10 if b in _WIDE else 2 for b in BLOCK_LDM}
FULL_CONTEXT = 2048
PROJ = ("to_q", "to_k", "to_v", "to_out.0")


def attn_shapes(width: Mapping[str, int], depth: Mapping[str, int], context: int,
                blocks: tuple[str, ...] = BLOCK_LDM) -> dict[str, tuple[int, int]]:
    """canonical path -> (out, in) of every attention Linear (attn1/attn2 to_q/to_k/to_v/to_out.0) of ``blocks``."""
    shapes = {}
    for b in blocks:
        w = width[b]
        for t in range(depth[b]):
            for attn in ("attn1", "attn2"):
                for p in PROJ:
                    kv_in = context if attn == "attn2" and p in ("to_k", "to_v") else w
                    shapes[f"{b}.transformer_blocks.{t}.{attn}.{p}"] = (w, kv_in)
    return shapes


TINY_ATTN_SHAPES = attn_shapes(TINY_WIDTH, TINY_DEPTH, TINY_CONTEXT)
FULL_ATTN_SHAPES = attn_shapes(FULL_WIDTH, FULL_DEPTH, FULL_CONTEXT)


def blora_shapes(shapes: Mapping[str, tuple[int, int]], blocks=(CONTENT, STYLE)) -> dict[str, tuple[int, int]]:
    """The entries of ``shapes`` inside ``blocks`` (default: the original B-LoRA pair)."""
    return {p: s for p, s in shapes.items() if p.startswith(tuple(b + "." for b in blocks))}


# --- naming, written from the index rule (independent of blora.arch.sdxl) --------------------------------------
_RESNET_INV = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def ldm_to_diffusers(path: str) -> str:
    """Diffusers name of an LDM attention-block or resnet path (what the test kit needs)."""
    root, n, sub, rest = (path.split(".", 3) + [""])[:4]
    if root == "middle_block":
        n, sub, rest = path.split(".", 2)[1], None, path.split(".", 2)[2]
        if n == "1":
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{int(n) // 2}.{_RESNET_INV[rest]}"
    n = int(n)
    if root == "input_blocks":
        x, i = (n - 1) // 3, (n - 1) % 3
        where = "down_blocks"
    elif root == "output_blocks":
        x, i = n // 3, n % 3
        where = "up_blocks"
    else:
        raise ValueError(f"test kit cannot name {path!r} in diffusers form")
    if sub == "1":
        return f"{where}.{x}.attentions.{i}.{rest}"
    if sub == "0":
        return f"{where}.{x}.resnets.{i}.{_RESNET_INV[rest]}"
    raise ValueError(f"test kit cannot name {path!r} in diffusers form")


def _unet_name(dialect: str, path: str) -> str:
    if path.startswith(("te1:", "te2:")):
        te, clip = path.split(":", 1)
        if dialect in ("kohya", "kohya_diffusers", "lycoris"):
            return f"lora_{te}_" + clip.replace(".", "_")
        if dialect == "comfy":
            return {"te1": "text_encoders.clip_l.transformer.", "te2": "text_encoders.clip_g.transformer."}[te] + clip
        return {"te1": "text_encoder.", "te2": "text_encoder_2."}[te] + clip
    return {
        "diffusers": lambda: "unet." + ldm_to_diffusers(path),
        "diffusers_doubled": lambda: "unet.unet." + ldm_to_diffusers(path),
        "peft": lambda: "unet." + ldm_to_diffusers(path),
        "peft_base_model": lambda: "base_model.model." + ldm_to_diffusers(path),
        "kohya": lambda: "lora_unet_" + path.replace(".", "_"),
        "lycoris": lambda: "lora_unet_" + path.replace(".", "_"),
        "kohya_diffusers": lambda: "lora_unet_" + ldm_to_diffusers(path).replace(".", "_"),
        "comfy": lambda: "diffusion_model." + path,
    }[dialect]()


_LORA_SUFFIX = {"diffusers": (".lora.down.weight", ".lora.up.weight"),
                "diffusers_doubled": (".lora.down.weight", ".lora.up.weight"),
                "peft": (".lora_A.weight", ".lora_B.weight"), "peft_base_model": (".lora_A.weight", ".lora_B.weight")}
_NO_ALPHA = ("diffusers", "diffusers_doubled", "peft", "peft_base_model")
_PEFT = ("peft", "peft_base_model")


def _split(n: int) -> int:
    """Largest divisor of n that is at most sqrt(n) (LoKr's w1 side)."""
    return max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)


def factors(modules: Mapping[str, tuple[int, int]], rank: int, seed: int, kind: str = "lora",
            dora: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Deterministic random factors per module (float32). lora: down (r, in), up (out, r); loha: w1a/w2a (out, r),
    w1b/w2b (r, in); lokr: w1 (a, b), w2a (out/a, r), w2b (r, in/b). With dora: ``dora_in`` (in,) and
    ``dora_out`` (out,), both > 0."""
    gen = torch.Generator().manual_seed(seed)
    dgen = torch.Generator().manual_seed(seed + 7919)  # apart, so DoRA does not change the other factors
    out = {}
    for path, (o, i) in modules.items():
        def rnd(*shape):
            return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5
        if kind == "lora":
            f = {"down": rnd(rank, i), "up": rnd(o, rank)}
        elif kind == "loha":
            f = {"w1a": rnd(o, rank), "w1b": rnd(rank, i), "w2a": rnd(o, rank), "w2b": rnd(rank, i)}
        elif kind == "lokr":
            a, b = _split(o), _split(i)
            f = {"w1": rnd(a, b), "w2a": rnd(o // a, rank), "w2b": rnd(rank, i // b)}
        else:
            raise ValueError(f"test kit: unknown kind {kind!r}")
        if dora:
            f["dora_in"], f["dora_out"] = 1.0 + torch.rand(i, generator=dgen), 1.0 + torch.rand(o, generator=dgen)
        out[path] = f
    return out


def reference_deltas(modules: Mapping[str, tuple[int, int]], rank: int, seed: int, alpha: float | None = None,
                     kind: str = "lora") -> dict[str, torch.Tensor]:
    """ΔW per canonical path by the textbook formulas: scale · up@down | (w1a w1b)⊙(w2a w2b) | w1 ⊗ (w2a w2b),
    scale = alpha / rank, 1 without alpha."""
    scale = 1.0 if alpha is None else alpha / rank
    deltas = {}
    for path, f in factors(modules, rank, seed, kind).items():
        if kind == "lora":
            w = f["up"] @ f["down"]
        elif kind == "loha":
            w = (f["w1a"] @ f["w1b"]) * (f["w2a"] @ f["w2b"])
        else:
            w = torch.kron(f["w1"], f["w2a"] @ f["w2b"])
        deltas[path] = w * scale
    return deltas


def make_state_dict(dialect: str, modules: Mapping[str, tuple[int, int]], rank: int, seed: int,
                    alpha: float | None = None, kind: str = "lora", dora: bool = False) -> dict[str, torch.Tensor]:
    """A realistic adapter file of ``dialect`` for ``modules`` (canonical path -> (out, in); ``te1:``/``te2:``
    paths allowed). Holds the ΔW that ``reference_deltas`` gives for the same arguments."""
    if kind != "lora" and dialect not in ("kohya", "comfy", "lycoris", "kohya_diffusers"):
        raise ValueError(f"test kit: {dialect} files hold only plain LoRA")
    if dora and dialect in ("diffusers", "diffusers_doubled"):
        raise ValueError("test kit: the diffusers dialect has no DoRA form")
    sd: dict[str, torch.Tensor] = {}
    for path, f in factors(modules, rank, seed, kind, dora).items():
        name = _unet_name(dialect, path)
        if kind == "lora":
            down_sfx, up_sfx = _LORA_SUFFIX.get(dialect, (".lora_down.weight", ".lora_up.weight"))
            up = f["up"] * (alpha / rank) if (alpha is not None and dialect in _NO_ALPHA) else f["up"]
            sd[name + down_sfx], sd[name + up_sfx] = f["down"], up
        elif kind == "loha":
            for n in ("w1_a", "w1_b", "w2_a", "w2_b"):
                sd[f"{name}.hada_{n}"] = f[n.replace("_", "")]
        else:
            sd[f"{name}.lokr_w1"], sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"] = f["w1"], f["w2a"], f["w2b"]
        if alpha is not None and dialect not in _NO_ALPHA:
            sd[name + ".alpha"] = torch.tensor(float(alpha))
        if dora and dialect in _PEFT:
            sd[name + ".lora_magnitude_vector"] = f["dora_out"]
        elif dora:
            sd[name + ".dora_scale"] = f["dora_in"].reshape(1, -1)
    return sd
