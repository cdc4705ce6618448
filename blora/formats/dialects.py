"""The key dialects of LoRA files, as data: how each names modules and tensors, and how to recognise it.

A file key is ``<prefix><module name><tensor suffix>``. Reading does not depend on the dialect: every key is split
by the suffix table and its module name resolved by the prefix table, so mixed files read too. The detected
dialect is reported, and decides how a file is written back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..adapters.kinds import KINDS

# (file suffix, adapter kind or None, canonical tensor name): each kind's own spellings (``blora.adapters.kinds``),
# then the entries any kind may carry (kind None): bias diff, alpha, DoRA magnitude.
SUFFIXES: tuple[tuple[str, str | None, str], ...] = tuple(
    (suffix, kind.name, name) for kind in KINDS.values() for suffix, name in kind.read_suffixes.items()) + (
    (".diff_b", None, "diff_b"), (".b_norm", None, "diff_b"),
    (".alpha", None, "alpha"), (".dora_scale", None, "dora_scale"),
    (".lora_magnitude_vector", None, "magnitude"), (".lora_magnitude_vector.weight", None, "magnitude"),
    (".lora_magnitude_vector.default", None, "magnitude"), (".lora_magnitude_vector.default.weight", None, "magnitude"),
)
SUFFIXES_LONGEST_FIRST = tuple(sorted(SUFFIXES, key=lambda row: -len(row[0])))

UNET_PREFIX = "diffusion_model."  # the UNet's keys in a ComfyUI model's state dict, and in the comfy dialect

# (key prefix, model part, spelling): "dotted" module paths (diffusers or LDM for the UNet, CLIP for text
# encoders) or "underscore" (kohya). Longest prefix first; "" is a bare UNet path (PEFT on the UNet itself).
# "unet" means the denoiser of any architecture (SDXL UNet, FLUX transformer: ``transformer.`` is diffusers' FLUX
# prefix, ``lora_transformer_`` OneTrainer's kohya spelling of it).
PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("text_encoders.clip_l.transformer.", "te1", "dotted"), ("text_encoders.clip_g.transformer.", "te2", "dotted"),
    (UNET_PREFIX, "unet", "dotted"), ("text_encoder_2.", "te2", "dotted"), ("text_encoder.", "te1", "dotted"),
    ("unet.unet.", "unet", "dotted"), ("unet.", "unet", "dotted"), ("transformer.", "unet", "dotted"),
    ("lora_unet_", "unet", "underscore"), ("lycoris_", "unet", "underscore"),
    ("lora_transformer_", "unet", "underscore"),
    ("lora_te1_", "te1", "underscore"), ("lora_te2_", "te2", "underscore"), ("lora_te_", "te1", "underscore"),
    ("", "unet", "dotted"),
)
WRAPPER_PREFIX = "base_model.model."  # PEFT model wrapper, stripped before the table applies

# The PEFT config component each model part belongs to (diffusers' ``lora_adapter_metadata``).
PEFT_COMPONENTS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}

_KOHYA_DIFFUSERS_ROOTS = ("down_blocks|mid_block|up_blocks|conv_in|conv_out|conv_norm_out|time_embedding|add_embedding"
                          "|transformer_blocks|single_transformer_blocks")


@dataclass(frozen=True)
class Dialect:
    """How one dialect spells keys.

    unet_prefix + module name (``naming``: "ldm" or "diffusers"; dots become ``_`` when ``underscore``) +
    tensor suffix; text encoders get ``te_prefixes`` (te1, te2) + their CLIP path. ``alpha``: stores a 0-d
    ``.alpha`` (otherwise alpha/rank is folded into ``up`` on writing). ``extended``: can hold LoHa, LoKr, full
    diffs, LoCon mid tensors, bias diffs and DoRA scales; ``magnitude``: the suffix of a per-output-row DoRA
    magnitude a plain dialect holds (PEFT), empty if none.
    """

    name: str
    detect: re.Pattern
    unet_prefix: str
    naming: str
    underscore: bool
    te_prefixes: tuple[str, str]
    down_up: tuple[str, str]
    alpha: bool
    extended: bool
    description: str
    magnitude: str = ""  # suffix of a per-output-row DoRA magnitude (PEFT's lora_magnitude_vector), if held


_KOHYA_TE = ("lora_te1_", "lora_te2_")
_DIFFUSERS_TE = ("text_encoder.", "text_encoder_2.")
_KOHYA_LORA = (".lora_down.weight", ".lora_up.weight")
_DIFFUSERS_LORA = (".lora.down.weight", ".lora.up.weight")

# Detection order: the first dialect one of whose patterns matches any key wins.
DIALECTS: tuple[Dialect, ...] = (
    Dialect("lycoris", re.compile(r"\.(hada|lokr)_(w1|w2|t1|t2)(_[ab])?$"), "lora_unet_", "ldm", True, _KOHYA_TE,
            _KOHYA_LORA, True, True, "LyCORIS LoHa/LoKr tensors (written with kohya LDM names)"),
    Dialect("diffusers_doubled", re.compile(r"^unet\.unet\."), "unet.unet.", "diffusers", False, _DIFFUSERS_TE,
            _DIFFUSERS_LORA, False, False, "original B-LoRA form with a doubled 'unet.unet.' prefix"),
    Dialect("peft", re.compile(r"\.lora_[AB](\.default)?\.weight$|\.lora_magnitude_vector"), "unet.", "diffusers",
            False, _DIFFUSERS_TE, (".lora_A.weight", ".lora_B.weight"), False, False,
            "PEFT / new diffusers (lora_A, lora_B)", ".lora_magnitude_vector"),
    Dialect("xlabs", re.compile(r"\.processor\.(qkv|proj)_lora[12]?\.(down|up)\.weight$"), "", "ldm", False,
            _DIFFUSERS_TE, _DIFFUSERS_LORA, False, False, "XLabs / USO FLUX (double_blocks.N.processor.qkv_lora1; read only)"),
    Dialect("diffusers", re.compile(r"(\.lora\.|_lora\.|\.lora_linear_layer\.)(down|up)\.weight$"), "unet.",
            "diffusers", False, _DIFFUSERS_TE, _DIFFUSERS_LORA, False, False,
            "original B-LoRA / diffusers attention processors (lora.down, lora.up)"),
    Dialect("kohya_diffusers", re.compile(rf"^(lora_unet|lycoris)_({_KOHYA_DIFFUSERS_ROOTS})_|^lora_transformer_"),
            "lora_unet_",
            "diffusers", True, _KOHYA_TE, _KOHYA_LORA, True, True, "kohya names in diffusers layout"),
    Dialect("kohya", re.compile(r"^lora_(unet|te\d?)_"), "lora_unet_", "ldm", True, _KOHYA_TE, _KOHYA_LORA, True,
            True, "kohya LDM names (sd-scripts, LyCORIS, A1111, stock ComfyUI)"),
    Dialect("comfy", re.compile(rf"^({re.escape(UNET_PREFIX)}|text_encoders\.)"), UNET_PREFIX, "ldm", False,
            ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer."), _KOHYA_LORA, True, True,
            "ComfyUI generic (diffusion_model.<path>, as TrainLoraNode writes)"),
)
BY_NAME: dict[str, Dialect] = {d.name: d for d in DIALECTS}
WRITABLE = ("kohya", "comfy", "diffusers", "peft", "kohya_diffusers", "diffusers_doubled", "lycoris")
