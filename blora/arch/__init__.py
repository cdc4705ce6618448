"""Architectures as data: one ``Architecture`` record per model family the pack supports (SDXL, FLUX.1).

A record states, once: the blocks (``Block``, addressable by host name, diffusers name, slot and role), which blocks
each role (``content``, ``style`` ...) means, how to recognise the architecture from a model's weight paths or an
adapter's canonical module paths, and its module map (``blora.arch.sdxl`` / ``blora.arch.flux``: host path <->
diffusers name <-> kohya spelling, and how split diffusers layers land on the host's fused ones).

Canonical module paths are the host's own (``comfy``) paths inside ``diffusion_model``; they never collide between
architectures (SDXL ``input_blocks``/``middle_block``/``output_blocks``, FLUX ``double_blocks``/``single_blocks``), so
the architecture of an adapter follows from its paths. Every node, the CLI and the trainer ask ``detect_model`` /
``adapter_architecture`` and refuse a mismatch through ``require_match``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from ..errors import ArchitectureError, BlockNameError


@dataclass(frozen=True)
class Block:
    """One block of an architecture's denoiser.

    ldm: the host (ComfyUI / LDM) module path (``output_blocks.1.1``, ``single_blocks.12``); diffusers: the diffusers
    name (``up_blocks.0.attentions.1``, ``single_transformer_blocks.12``); slot: a short name (SDXL: the LBW slot
    ``OUT1``; FLUX: ``S12``); width: channels at full width; depth: transformer blocks at full depth (FLUX: 1);
    role: the role it plays alone or as part of a range (``content`` / ``style`` / ``layout``) or None; arch: the
    architecture's name.
    """

    ldm: str
    diffusers: str
    slot: str
    width: int
    depth: int
    role: str | None = None
    arch: str = "sdxl"

    @property
    def kohya(self) -> str:
        """Prefix of kohya-style key names: ``lora_unet_output_blocks_1_1``, ``lora_unet_single_blocks_12``."""
        return "lora_unet_" + self.ldm.replace(".", "_")


@dataclass(frozen=True)
class Piece:
    """The rows of a fused host layer that one split (diffusers) layer fills: part ``index`` of ``layout``, whose
    parts have sizes ``sizes`` (multiples of the layer's input width), in row order. FLUX's ``img_attn.qkv`` is
    the layout ``qkv`` (to_q, to_k, to_v: 1, 1, 1); its single blocks' ``linear1`` is ``linear1`` (to_q, to_k, to_v,
    proj_mlp: 1, 1, 1, mlp_ratio)."""

    layout: str
    index: int
    sizes: tuple[float, ...]

    def rows(self, in_features: int) -> tuple[int, int]:
        """(start, stop) of this part's rows in the fused weight of a layer with ``in_features`` inputs."""
        widths = [int(round(s * in_features)) for s in self.sizes]
        start = sum(widths[: self.index])
        return start, start + widths[self.index]

    def total(self, in_features: int) -> int:
        return sum(int(round(s * in_features)) for s in self.sizes)


@dataclass(frozen=True)
class Architecture:
    """What the pack knows about one model family.

    name: registry id (``sdxl``, ``flux``); title: how people write it; blocks: in model order; roles: role -> names
    of its blocks (host names); presets: further named block sets (e.g. FLUX ``boundary``); block_pattern: matches the
    block prefix of a canonical module path (group 1); signature: host module-path prefixes a model of this
    architecture always has (recognition from weights); diffusers_prefix: the component prefix diffusers files use
    (``unet.``, ``transformer.``); citation: where the roles come from; sub_path: what may follow a block name in
    block-weights text (regex, lower-case).
    """

    name: str
    title: str
    blocks: tuple[Block, ...]
    roles: Mapping[str, tuple[str, ...]]
    block_pattern: re.Pattern
    signature: tuple[str, ...]
    diffusers_prefix: str
    citation: str
    sub_path: re.Pattern
    presets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    is_module: Callable[[str], bool] = lambda path: False
    resolve_name: Callable[[str, bool], "tuple[str, Piece | None] | None"] = lambda name, underscore: None
    diffusers_names: Callable[[str], "tuple[tuple[str, Piece | None], ...] | None"] = lambda path: None
    article: str = "a"

    def __post_init__(self) -> None:
        by_name: dict[str, Block] = {}
        for b in self.blocks:
            for name in (b.ldm, b.diffusers, "diffusion_model." + b.ldm, b.slot, b.kohya,
                         "lora_unet_" + b.diffusers.replace(".", "_"), self.diffusers_prefix + b.diffusers):
                by_name[name.lower()] = b
        object.__setattr__(self, "_by_name", by_name)

    def block(self, name: str) -> Block | None:
        """The block called ``name`` (any of its names, case-insensitive), or None."""
        return self._by_name.get(name.strip().lower())  # type: ignore[attr-defined]

    def resolve(self, name: str) -> tuple[Block, ...]:
        """The blocks ``name`` means: a role or preset (several blocks for FLUX) or one block by any of its names.
        Raises BlockNameError naming the name and the choices."""
        key = name.strip().lower()
        group = {**self.presets, **self.roles}.get(key)
        if group is not None:
            return tuple(self._by_name[n.lower()] for n in group)  # type: ignore[attr-defined]
        block = self.block(key)
        if block is None:
            raise BlockNameError(f"unknown block {name!r} in {self.title}: use a role or preset "
                                 f"({', '.join(list(self.roles) + list(self.presets))}) or a block name such as "
                                 f"{self.blocks[0].ldm!r} or {self.blocks[-1].slot!r}")
        return (block,)

    def block_of(self, module: str) -> Block | None:
        """The block holding a canonical module path, or None (embeddings, final layer ...)."""
        m = self.block_pattern.match(module)
        return self.block(m.group(1)) if m else None

    def role_of(self, block: Block) -> str | None:
        return next((r for r, names in self.roles.items() if block.ldm in names), None)

    def missing(self, paths: Iterable[str]) -> str | None:
        """The first signature module path a model with these weight paths lacks (None: it is this architecture),
        described with its role (``attention block output_blocks.0.1 (content block)``)."""
        paths = list(paths)
        for sig in self.signature:
            if not any(p == sig or p.startswith(sig + ".") for p in paths):
                block = self.block_of(sig)
                role = self.role_of(block) if block is not None and block.ldm == sig else None
                return (f"attention block {sig} ({role} block)" if role else f"layer {sig}")
        return None

    def matches_model(self, paths: Iterable[str]) -> bool:
        """Whether a model with these canonical weight paths is of this architecture (every signature prefix)."""
        return self.missing(paths) is None


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


def get(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def detect_model(paths: Iterable[str]) -> Architecture | None:
    """The architecture of a model from its canonical weight paths (``double_blocks.0.img_attn.qkv`` ...)."""
    paths = list(paths)
    return next((a for a in ARCHITECTURES.values() if a.matches_model(paths)), None)


def architecture_of_path(path: str) -> Architecture | None:
    """The architecture a canonical module path belongs to (text-encoder paths ``te1:`` ... belong to none)."""
    if ":" in path:
        return None
    return next((a for a in ARCHITECTURES.values() if a.is_module(path)), None)


def adapter_architecture(paths: Iterable[str], source: str = "adapter") -> Architecture | None:
    """The one architecture an adapter's canonical module paths belong to; None when no path names a denoiser
    module (a text-encoder-only file). Raises ArchitectureError for a file mixing architectures."""
    names = {a.name for a in (architecture_of_path(p) for p in paths) if a is not None}
    found = {n: a for n, a in ARCHITECTURES.items() if n in names}  # registry order
    if len(found) > 1:
        raise ArchitectureError(f"{source}: mixes modules of {' and '.join(a.title for a in found.values())}")
    return next(iter(found.values()), None)


def require_match(model_paths: Iterable[str], model_name: str, adapters: Iterable[tuple[str, Iterable[str]]],
                  supported: Iterable[str] | None = None) -> Architecture:
    """Raise ArchitectureError unless the model (its canonical weight paths) is of a supported architecture and
    every adapter (source, module paths) is for it. Returns the model's architecture."""
    model_paths = list(model_paths)
    adapters = [(source, list(paths)) for source, paths in adapters]
    names = tuple(supported or ARCHITECTURES)
    model_arch = detect_model(model_paths)
    if model_arch is None or model_arch.name not in names:
        wanted = [a for a in (adapter_architecture(p, s) for s, p in adapters) if a is not None and a.name in names]
        expected = wanted[0] if wanted else get(names[0])
        what = expected.missing(model_paths)
        detail = f"it has no {what}" if what else f"it is {model_arch.title}"
        raise ArchitectureError(f"B-LoRA needs {expected.article} {expected.title}-architecture model, got "
                                f"{model_name}: {detail}")
    for source, paths in adapters:
        arch = adapter_architecture(paths, source)
        if arch is not None and arch.name != model_arch.name:
            raise ArchitectureError(f"{source}: is a {arch.title} adapter, the model is {model_arch.title} "
                                    f"({model_name}); load a {model_arch.title} LoRA or another model")
    return model_arch


def block_of(module: str) -> Block | None:
    """The block (any architecture) holding a canonical module path, or None."""
    arch = architecture_of_path(module)
    return arch.block_of(module) if arch else None


def resolve_blocks(name: str, arch: Architecture | str | None = None) -> tuple[Block, ...]:
    """The blocks ``name`` means in ``arch`` (default: the architecture whose block it names, else SDXL for roles,
    as before FLUX existed)."""
    if arch is not None:
        return (get(arch) if isinstance(arch, str) else arch).resolve(name)
    for a in ARCHITECTURES.values():
        block = a.block(name)
        if block is not None:
            return (block,)
    return get("sdxl").resolve(name)


from . import sdxl, flux  # noqa: E402,F401,I001  (each registers its architecture)

SDXL = sdxl.ARCHITECTURE
FLUX = flux.ARCHITECTURE
