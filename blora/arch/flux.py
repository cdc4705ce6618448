"""FLUX.1 (dev and schnell), stated once: its blocks, the content/style presets and its module map.

Blocks (the host's ``comfy/ldm/flux/model.py``, both 0.3.64 and 0.33.0): 19 double-stream blocks ``double_blocks.0-18``
(separate image and text weights, joint attention) and 38 single-stream blocks ``single_blocks.0-37``. The Linear
layers as the host names them (``comfy/ldm/flux/layers.py``):

    double_blocks.N: img_mod.lin, img_attn.qkv, img_attn.proj, img_mlp.0, img_mlp.2,
                     txt_mod.lin, txt_attn.qkv, txt_attn.proj, txt_mlp.0, txt_mlp.2
    single_blocks.N: linear1 (fused q, k, v and MLP-in), linear2 (attention-out and MLP-out), modulation.lin
    outside blocks:  img_in, txt_in, time_in.{in,out}_layer, vector_in.{in,out}_layer, guidance_in.{in,out}_layer
                     (dev only), final_layer.linear, final_layer.adaLN_modulation.1

Diffusers (``FluxTransformer2DModel``) splits what the host fuses: ``transformer_blocks.N.attn.to_q/to_k/to_v`` are
the three thirds of ``img_attn.qkv`` (``add_q_proj``... of ``txt_attn.qkv``), and
``single_transformer_blocks.N.attn.to_q/to_k/to_v`` and ``proj_mlp`` the four parts of ``linear1`` (hidden, hidden,
hidden, mlp_ratio·hidden rows; FLUX.1's mlp_ratio is 4), as the host's own map (``comfy.utils.flux_to_diffusers``)
lands them. ``norm_out.linear`` (diffusers) is the host's ``final_layer.adaLN_modulation.1`` with its two halves
swapped; the pack leaves it unmapped (a B-LoRA never touches it).

Presets. The content/style split is SplitFlux's finding (Yang et al., "SplitFlux: Learning to Decouple Content and
Style from a Single Image", CVPR 2026, arXiv 2511.15258), not this pack's: numbering FLUX's 57 blocks 1-57 (double
1-19, single 20-57), prompt-replacement experiments showed the double-stream blocks (1-19) have negligible effect on
the split, early single-stream blocks 20-29 mainly control content and later ones 30-57 style, with 30-31 at the
boundary (where SplitFlux constrains the rank). In host names: content = single_blocks.0-9, style =
single_blocks.10-37, boundary = single_blocks.10-11. The pack takes only the block split; SplitFlux's
rank-constrained adaptation and visual-gated LoRA are not implemented.
"""
from __future__ import annotations

import re
from typing import Iterator

from . import Architecture, Block, Piece, register

DOUBLE_BLOCKS = 19
SINGLE_BLOCKS = 38
HIDDEN = 3072
MLP_RATIO = 4.0

DOUBLE_LINEARS = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                  "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
SINGLE_LINEARS = ("linear1", "linear2", "modulation.lin")
OUTER_LINEARS = {  # host path -> diffusers name
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
UNMAPPED_HOST = ("final_layer.adaLN_modulation.1",)  # diffusers norm_out.linear: shift/scale halves swapped

QKV = (1.0, 1.0, 1.0)
LINEAR1 = (1.0, 1.0, 1.0, MLP_RATIO)
DOUBLE_DIFFUSERS = {  # host name inside a double block -> diffusers name(s) inside transformer_blocks.N
    "img_attn.qkv": (("attn.to_q", Piece("qkv", 0, QKV)), ("attn.to_k", Piece("qkv", 1, QKV)),
                     ("attn.to_v", Piece("qkv", 2, QKV))),
    "txt_attn.qkv": (("attn.add_q_proj", Piece("qkv", 0, QKV)), ("attn.add_k_proj", Piece("qkv", 1, QKV)),
                     ("attn.add_v_proj", Piece("qkv", 2, QKV))),
    "img_attn.proj": (("attn.to_out.0", None),), "txt_attn.proj": (("attn.to_add_out", None),),
    "img_mlp.0": (("ff.net.0.proj", None),), "img_mlp.2": (("ff.net.2", None),),
    "txt_mlp.0": (("ff_context.net.0.proj", None),), "txt_mlp.2": (("ff_context.net.2", None),),
    "img_mod.lin": (("norm1.linear", None),), "txt_mod.lin": (("norm1_context.linear", None),),
}
SINGLE_DIFFUSERS = {  # host name inside a single block -> diffusers name(s) inside single_transformer_blocks.N
    "linear1": (("attn.to_q", Piece("linear1", 0, LINEAR1)), ("attn.to_k", Piece("linear1", 1, LINEAR1)),
                ("attn.to_v", Piece("linear1", 2, LINEAR1)), ("proj_mlp", Piece("linear1", 3, LINEAR1))),
    "linear2": (("proj_out", None),), "modulation.lin": (("norm.linear", None),),
}
# XLabs (and ByteDance USO) name the layers they adapt after the attention processor that holds the LoRA; the
# single blocks' ``qkv_lora`` adapts only the q, k, v rows of linear1 (the host maps it the same way, as
# ``linear1_qkv``). Keys: ``double_blocks.0.processor.qkv_lora1.down.weight``, ``single_blocks.0.processor.proj_lora…``.
LINEAR1_QKV = (3.0, MLP_RATIO)
XLABS_DOUBLE = {"qkv_lora1": ("img_attn.qkv", None), "proj_lora1": ("img_attn.proj", None),
                "qkv_lora2": ("txt_attn.qkv", None), "proj_lora2": ("txt_attn.proj", None)}
XLABS_SINGLE = {"qkv_lora": ("linear1", Piece("linear1_qkv", 0, LINEAR1_QKV)), "proj_lora": ("linear2", None)}
_XLABS = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv_lora[12]?|proj_lora[12]?|qkv|proj)$")
# LyCORIS on diffusers FLUX (and ComfyUI's map) also spell the feed-forward layers linear_in / linear_out
DIFFUSERS_ALIASES = {"ff.linear_in": "ff.net.0.proj", "ff.linear_out": "ff.net.2",
                     "ff_context.linear_in": "ff_context.net.0.proj", "ff_context.linear_out": "ff_context.net.2"}

SPLITFLUX = ("SplitFlux (Yang et al., CVPR 2026, arXiv 2511.15258): single-stream blocks 20-29 of 57 content, "
             "30-57 style, 30-31 the boundary; double-stream blocks 1-19 negligible for the split")
CONTENT = tuple(f"single_blocks.{n}" for n in range(0, 10))
STYLE = tuple(f"single_blocks.{n}" for n in range(10, SINGLE_BLOCKS))
BOUNDARY = ("single_blocks.10", "single_blocks.11")


def _blocks() -> tuple[Block, ...]:
    double = tuple(Block(f"double_blocks.{n}", f"transformer_blocks.{n}", f"D{n:02d}", HIDDEN, 1, None, "flux")
                   for n in range(DOUBLE_BLOCKS))
    single = tuple(Block(f"single_blocks.{n}", f"single_transformer_blocks.{n}", f"S{n:02d}", HIDDEN, 1,
                         "content" if f"single_blocks.{n}" in CONTENT else "style", "flux")
                   for n in range(SINGLE_BLOCKS))
    return double + single


FLUX_BLOCKS = _blocks()


def flux_modules() -> Iterator[tuple[str, tuple[tuple[str, Piece | None], ...]]]:
    """(host path, its diffusers name(s) with pieces) of every Linear of full-depth FLUX.1, in model order."""
    for host, diffusers in OUTER_LINEARS.items():
        yield host, ((diffusers, None),)
    for n in range(DOUBLE_BLOCKS):
        for inner in DOUBLE_LINEARS:
            yield (f"double_blocks.{n}.{inner}",
                   tuple((f"transformer_blocks.{n}.{d}", p) for d, p in DOUBLE_DIFFUSERS[inner]))
    for n in range(SINGLE_BLOCKS):
        for inner in SINGLE_LINEARS:
            yield (f"single_blocks.{n}.{inner}",
                   tuple((f"single_transformer_blocks.{n}.{d}", p) for d, p in SINGLE_DIFFUSERS[inner]))
    for host in UNMAPPED_HOST:
        yield host, ()


FLUX_MODULES: dict[str, tuple[tuple[str, Piece | None], ...]] = dict(flux_modules())
DIFFUSERS_TO_HOST: dict[str, tuple[str, Piece | None]] = {
    d: (host, piece) for host, names in FLUX_MODULES.items() for d, piece in names}
KOHYA_HOST: dict[str, str] = {host.replace(".", "_"): host for host in FLUX_MODULES}
KOHYA_DIFFUSERS: dict[str, str] = {d.replace(".", "_"): d for d in DIFFUSERS_TO_HOST}
if len(KOHYA_HOST) != len(FLUX_MODULES) or len(KOHYA_DIFFUSERS) != len(DIFFUSERS_TO_HOST) or (
        set(KOHYA_HOST) & set(KOHYA_DIFFUSERS)):
    raise AssertionError("FLUX module names collide once dots become underscores")

_BLOCK = re.compile(r"^((?:double|single)_blocks\.\d+)(\.|$)")


def is_flux_module(path: str) -> bool:
    """Whether ``path`` (host naming) is a Linear of full-depth FLUX.1."""
    return path in FLUX_MODULES


def diffusers_to_host(name: str) -> tuple[str, Piece | None] | None:
    """(host path, piece) of a diffusers module name (``single_transformer_blocks.3.attn.to_k`` ->
    (``single_blocks.3.linear1``, part 1 of linear1)), None if FLUX.1 has no such layer."""
    for alias, real in DIFFUSERS_ALIASES.items():
        name = re.sub(rf"(transformer_blocks\.\d+\.){re.escape(alias)}$", rf"\g<1>{real}", name)
    return DIFFUSERS_TO_HOST.get(name)


def resolve_name(name: str, underscore: bool) -> tuple[str, Piece | None] | None:
    """(host path, piece) of a module name without its dialect prefix: kohya spelling of a host or diffusers name
    when ``underscore``, else a dotted host or diffusers name."""
    if underscore:
        if name in KOHYA_HOST:
            return KOHYA_HOST[name], None
        name = KOHYA_DIFFUSERS.get(name, "")
        return diffusers_to_host(name) if name else None
    if is_flux_module(name):
        return name, None
    m = _XLABS.match(name)
    if m:
        kind, n, layer = m.groups()
        layer = layer if layer.startswith(("qkv_lora", "proj_lora")) else layer + "_lora"  # "…proj" + "_lora.down"
        inner, piece = (XLABS_DOUBLE if kind == "double_blocks" else XLABS_SINGLE).get(layer, (None, None))
        return (f"{kind}.{n}.{inner}", piece) if inner else None
    return diffusers_to_host(name)


def diffusers_names(path: str) -> tuple[tuple[str, Piece | None], ...] | None:
    """The diffusers name(s) of a host path, each with the rows of the host layer it holds; None if none."""
    return FLUX_MODULES.get(path) or None


ARCHITECTURE = register(Architecture(
    name="flux", title="FLUX.1", blocks=FLUX_BLOCKS,
    roles={"content": CONTENT, "style": STYLE},
    presets={"boundary": BOUNDARY,
             "double": tuple(f"double_blocks.{n}" for n in range(DOUBLE_BLOCKS)),
             "single": tuple(f"single_blocks.{n}" for n in range(SINGLE_BLOCKS))},
    block_pattern=_BLOCK,
    # FLUX.1's per-block modulation: FLUX.2 (global modulation) and Chroma (none) share the block names but not the
    # layout or the split's evidence, and are not recognised as FLUX.1
    signature=("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mod.lin", "single_blocks.0.linear1"),
    diffusers_prefix="transformer.",
    citation=SPLITFLUX,
    sub_path=re.compile(r"^(img_mod(\.lin)?|txt_mod(\.lin)?|(img|txt)_attn(\.(qkv|proj))?|(img|txt)_mlp(\.[02])?"
                        r"|linear1|linear2|modulation(\.lin)?)$"),
    is_module=is_flux_module,
    resolve_name=resolve_name,
    diffusers_names=diffusers_names,
))
