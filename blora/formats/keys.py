"""Key dialects in and out: detect_dialect(keys), to_canonical(state_dict) -> Adapter, from_canonical(adapter, dialect).

Canonical module paths are the host's paths inside the diffusion model (SDXL: LDM paths such as
``output_blocks.1.1.transformer_blocks.3.attn2.to_k``; FLUX.1: ``single_blocks.3.linear1``) and ``te1:`` / ``te2:`` +
CLIP paths for the SDXL text encoders. Which architecture a name belongs to is ``blora.arch``'s business; split
diffusers layers (FLUX's to_q/to_k/to_v) are fused onto the host's layers and split back by ``blora.arch.fused``. Alpha semantics: a file without ``.alpha`` has scale 1
(alpha None); kohya ``.alpha`` gives scale alpha/rank; diffusers' ``lora_adapter_metadata`` (PEFT config) supplies
lora_alpha (rsLoRA stored as alpha·√r so that alpha/r is PEFT's alpha/√r).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping

import torch

from .. import arch
from ..arch import fused
from ..arch import sdxl as unet_map
from ..adapters.adapter import Adapter, ModuleAdapter, is_text_encoder
from .dialects import (BY_NAME, DIALECTS, PEFT_COMPONENTS, PREFIXES, SUFFIXES_LONGEST_FIRST, WRAPPER_PREFIX,
                       WRITABLE, Dialect)
from ..errors import AdapterFileError, BLoRAError
from .metadata import trigger_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Part:
    key: str
    kind: str | None
    name: str
    tensor: torch.Tensor


def detect_dialect(keys: Iterable[str]) -> str:
    """The dialect of a file's keys: lycoris, diffusers_doubled, peft, diffusers, kohya_diffusers, kohya or comfy
    (the first in that order that any key matches). Raises BLoRAError naming a few keys if none matches."""
    keys = list(keys)
    for dialect in DIALECTS:
        if any(dialect.detect.search(k) for k in keys):
            return dialect.name
    sample = ", ".join(repr(k) for k in keys[:3]) or "no keys at all"
    raise BLoRAError(f"not a LoRA file of any known dialect (kohya, comfy, diffusers, PEFT, LyCORIS): {sample}")


def split_key(key: str) -> tuple[str, str | None, str] | None:
    """(module name, kind, tensor name) of a file key, or None for a tensor suffix no dialect uses."""
    for suffix, kind, name in SUFFIXES_LONGEST_FIRST:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], kind, name
    return None


@dataclass(frozen=True)
class Target:
    """Where a file's module name lands: model part (``unet`` for any denoiser, ``te1``/``te2``), canonical path,
    the piece of a fused host layer it fills (None: the whole layer), and its name without the dialect prefix."""

    part: str
    path: str
    piece: arch.Piece | None = None
    name: str = ""

    @property
    def canonical(self) -> str:
        return self.path if self.part == "unet" else f"{self.part}:{self.path}"


def resolve_target(name: str) -> Target | None:
    """Where module name ``name`` (with its dialect prefix) lands in any supported architecture, or None."""
    while name.startswith(WRAPPER_PREFIX):
        name = name[len(WRAPPER_PREFIX):]
    for prefix, part, spelling in PREFIXES:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if part == "unet":
            for a in arch.ARCHITECTURES.values():
                found = a.resolve_name(rest, spelling == "underscore")
                if found is not None:
                    return Target("unet", found[0], found[1], rest)
            continue
        path = unet_map.kohya_to_te(part, rest) if spelling == "underscore" else (
            rest if rest in unet_map.TE_PATHS[part] else None)
        if path is not None:
            return Target(part, path, None, rest)
    return None


def resolve_module(name: str) -> tuple[str, str] | None:
    """(model part, path) of a module name with its dialect prefix: ("unet", canonical path of the denoiser
    module, the whole fused layer for a split piece) or ("te1"/"te2", CLIP path). None if it names no module of a
    supported architecture."""
    target = resolve_target(name)
    return (target.part, target.path) if target else None


def to_canonical(state_dict: Mapping[str, torch.Tensor], source: str = "",
                 metadata: Mapping[str, str] | None = None) -> Adapter:
    """The adapter a state dict holds, whatever its dialect. Keys naming no SDXL module, or with a tensor suffix
    no dialect uses, are listed in ``Adapter.unmapped``. Errors (AdapterFileError naming ``source`` and the key):
    unknown dialect, no SDXL module at all, a module spelled twice, mixed kinds, bad shapes (rank mismatch)."""
    where = source or "<state dict>"
    metadata = dict(metadata or {})
    try:
        dialect = detect_dialect(state_dict.keys())
    except BLoRAError as e:
        raise AdapterFileError(where, str(e)) from None
    groups, unmapped = _group(state_dict, where)
    alpha_of = _peft_alphas(metadata, where)
    modules: dict[str, ModuleAdapter] = {}
    first_key: dict[str, str] = {}
    pieces: dict[str, dict[int, tuple[ModuleAdapter, str]]] = {}
    layouts: dict[str, arch.Piece] = {}
    for module_name, parts in groups.items():
        target = resolve_target(module_name)
        try:
            built = _build(parts, where, target, alpha_of) if target else None
        except AdapterFileError:
            raise
        except (IndexError, ValueError, RuntimeError, TypeError) as e:  # shapes no kind's own check foresaw
            key = next(iter(parts.values())).key
            raise AdapterFileError(where, f"its tensors {[tuple(p.tensor.shape) for p in parts.values()]} do not "
                                          f"form an adapter ({type(e).__name__}: {e})", key) from None
        if built is None:
            unmapped.extend(p.key for p in parts.values())
            continue
        path = target.canonical
        key = next(iter(parts.values())).key
        if target.piece is not None:
            held = pieces.setdefault(path, {})
            if target.piece.index in held:
                raise AdapterFileError(where, f"part {target.piece.index} of {path} is given twice (also by "
                                              f"{held[target.piece.index][1]!r})", key)
            held[target.piece.index], layouts[path] = (built, key), target.piece
            continue
        if path in modules:
            raise AdapterFileError(where, f"module {path} is given twice (also by {first_key[path]!r})", key)
        modules[path], first_key[path] = built, key
    for path, held in pieces.items():
        key = next(iter(held.values()))[1]
        if path in modules:
            raise AdapterFileError(where, f"module {path} is given both whole and as split parts (also by "
                                          f"{first_key[path]!r})", key)
        try:
            modules[path] = fused.fuse({i: m for i, (m, _) in held.items()}, layouts[path], path)
        except BLoRAError as e:
            raise AdapterFileError(where, str(e), key) from None
        first_key[path] = key
    if not modules:
        raise AdapterFileError(where, f"none of its {len(state_dict)} keys is a module of a supported architecture "
                                      f"({', '.join(a.title for a in arch.ARCHITECTURES.values())} denoiser, SDXL "
                                      f"text encoders) (e.g. {sorted(unmapped)[:2]}): a LoRA for another "
                                      f"architecture?")
    try:
        arch.adapter_architecture(modules, where)
    except BLoRAError as e:
        raise AdapterFileError(where, str(e)) from None
    return Adapter(modules=modules, source=source, dialect=dialect, metadata=metadata,
                   unmapped=tuple(sorted(unmapped)), trigger=trigger_of(metadata))


def _group(state_dict: Mapping[str, torch.Tensor], where: str) -> tuple[dict[str, dict[str, _Part]], list[str]]:
    """Keys grouped by module name (tensor name -> part), and the keys with a suffix no dialect uses. Two keys
    for one tensor of one module (``lora_A.weight`` and ``lora_A.default.weight``) are an error."""
    groups: dict[str, dict[str, _Part]] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, kind, name = split
        group = groups.setdefault(module, {})
        if name in group:
            raise AdapterFileError(where, f"gives the {name} tensor of {module!r} twice (also as "
                                          f"{group[name].key!r})", key)
        group[name] = _Part(key, kind, name, tensor)
    return groups, unknown


def _build(parts: Mapping[str, _Part], where: str, target: Target,
           alpha_of: Callable[[str, str, int], float | None] | None) -> ModuleAdapter | None:
    """One module from its tensors; None when it holds only alpha / DoRA / bias entries (nothing to apply)."""
    kinds = {p.kind for p in parts.values() if p.kind}
    main = next(p for p in parts.values())
    if not kinds:
        return None
    if len(kinds) > 1:
        raise AdapterFileError(where, f"mixes tensors of kinds {sorted(kinds)} for one module", main.key)
    kind = kinds.pop()
    tensors = {n: p.tensor for n, p in parts.items() if p.kind == kind or n == "diff_b"}
    main = next(p for p in parts.values() if p.kind == kind)
    try:
        module = ModuleAdapter(kind, tensors, _alpha(parts, where), _dora(parts, tensors))
    except BLoRAError as e:
        raise AdapterFileError(where, str(e), main.key) from None
    _check_shapes(module, parts, where)
    if module.dora_scale is not None and _per_output_row(module):
        module = replace(module, dora_norm="adapted")
    if module.alpha is None and alpha_of is not None and module.rank:
        component = PEFT_COMPONENTS[target.part]
        owner = arch.architecture_of_path(target.path) if target.part == "unet" else None
        if owner is not None:
            component = owner.diffusers_prefix.rstrip(".")  # "unet", "transformer"
        module = replace(module, alpha=alpha_of(component, _diffusers_name(target), module.rank))
    return module


def _diffusers_name(target: Target) -> str:
    """The diffusers name of a target (PEFT's alpha_pattern is keyed by it)."""
    if target.part != "unet":
        return target.path
    if target.piece is not None:
        return target.name
    owner = arch.architecture_of_path(target.path)
    names = owner.diffusers_names(target.path) if owner else None
    return names[0][0] if names else target.path


def _alpha(parts: Mapping[str, _Part], where: str) -> float | None:
    p = parts.get("alpha")
    if p is None:
        return None
    if p.tensor.numel() != 1:
        raise AdapterFileError(where, f"alpha must be a single number, found shape {tuple(p.tensor.shape)}", p.key)
    return float(p.tensor.reshape(()).item())


def _dora(parts: Mapping[str, _Part], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    if "dora_scale" in parts:
        return parts["dora_scale"].tensor
    if "magnitude" in parts:  # PEFT: per output row, shape (out,): store as the output-axis dora_scale
        m = parts["magnitude"].tensor
        ndim = tensors["up"].ndim if "up" in tensors else 2
        return m.reshape(-1, *[1] * (ndim - 1))
    return None


def _per_output_row(module: ModuleAdapter) -> bool:
    """Whether a module's DoRA magnitude is per output row (PEFT's ``lora_magnitude_vector``, LyCORIS 3.2+'s (out, 1)
    ``dora_scale``; the host's own test: ``dora_scale.shape[0] == W.shape[0]``). Both home tools normalise such a
    magnitude by ‖W + ΔW‖, so it renders "adapted"; an input-axis (1, in) scale renders the host's way."""
    out = module.out_in[0]
    return module.dora_scale.shape[0] == out and out > 1


def _check_shapes(module: ModuleAdapter, parts: Mapping[str, _Part], where: str) -> None:
    """The kind's own checks ran when the module was made; here: a DoRA magnitude fits one axis of the weight."""
    if module.dora_scale is None:
        return
    out, inp = module.out_in
    if module.dora_scale.shape[0] != out and ("magnitude" in parts or module.dora_scale.numel() != inp):
        dkey = (parts.get("dora_scale") or parts["magnitude"]).key
        raise AdapterFileError(where, f"DoRA scale of shape {tuple(module.dora_scale.shape)} fits neither the "
                                      f"output ({out}) nor the input ({inp}) axis", dkey)


def _peft_alphas(metadata: Mapping[str, str], where: str) -> Callable[[str, str, int], float | None] | None:
    """lora_alpha per module from diffusers' ``lora_adapter_metadata`` (``{"unet.lora_alpha": 8, ...}``)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except (TypeError, ValueError):
        raise AdapterFileError(where, "metadata 'lora_adapter_metadata' is not JSON") from None

    def alpha_of(component: str, module: str, rank: int) -> float | None:
        alpha = config.get(f"{component}.lora_alpha")
        for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = value
        if alpha is None:
            return None
        # ComfyUI scale = alpha / r; PEFT: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
        return float(alpha) * math.sqrt(rank) if config.get(f"{component}.use_rslora") else float(alpha)

    return alpha_of


# The prefix a diffusers-naming dialect gives a non-SDXL denoiser: diffusers' own component name (``transformer.``)
# and OneTrainer's kohya spelling of it (``lora_transformer_``), both read by the host's loader for FLUX.
_DIFFUSERS_PREFIX_FOR = {"unet.": "{component}.", "lora_unet_": "lora_{component}_"}


def module_key(dialect: Dialect, path: str) -> str:
    """The module name (prefix included) ``dialect`` gives canonical ``path`` (a whole layer; split pieces of a
    fused layer come from ``module_units``)."""
    if is_text_encoder(path):
        part, clip = path.split(":", 1)
        name = clip.replace(".", "_") if dialect.underscore else clip
        return dialect.te_prefixes[0 if part == "te1" else 1] + name
    units = _diffusers_units(dialect, path) if dialect.naming == "diffusers" else None
    if units is None:
        return dialect.unet_prefix + (path.replace(".", "_") if dialect.underscore else path)
    prefix, names = units
    if len(names) != 1 or names[0][1] is not None:
        raise BLoRAError(f"module {path!r} is split into {len(names)} layers in diffusers naming: use module_units")
    return prefix + (names[0][0].replace(".", "_") if dialect.underscore else names[0][0])


def _diffusers_units(dialect: Dialect, path: str) -> tuple[str, tuple[tuple[str, arch.Piece | None], ...]]:
    """(key prefix, diffusers names with pieces) of a denoiser path in a diffusers-naming dialect."""
    owner = arch.architecture_of_path(path)
    names = owner.diffusers_names(path) if owner else None
    if names is None:
        raise BLoRAError(f"module {path!r} has no diffusers name (not a module of a supported architecture's "
                         f"diffusers layout): write it as kohya or comfy")
    prefix = dialect.unet_prefix
    if owner.diffusers_prefix != "unet.":
        component = owner.diffusers_prefix.rstrip(".")
        if prefix not in _DIFFUSERS_PREFIX_FOR:
            raise BLoRAError(f"the {dialect.name} dialect is SDXL-only ({prefix!r}); write this {owner.title} "
                             f"adapter as peft, kohya or comfy")
        prefix = _DIFFUSERS_PREFIX_FOR[prefix].format(component=component)
    return prefix, names


def module_units(dialect: Dialect, path: str, module: ModuleAdapter) -> list[tuple[str, ModuleAdapter]]:
    """(module name with prefix, module) for what ``dialect`` writes of canonical ``path``: one unit, or one per
    split layer when diffusers naming splits a fused host layer (``blora.arch.fused.split``: exact)."""
    if path.startswith(("te1:", "te2:")) or dialect.naming != "diffusers":
        return [(module_key(dialect, path), module)]
    prefix, names = _diffusers_units(dialect, path)
    spell = (lambda n: n.replace(".", "_")) if dialect.underscore else (lambda n: n)
    if len(names) == 1 and names[0][1] is None:
        return [(prefix + spell(names[0][0]), module)]
    return [(prefix + spell(n), m) for n, m in fused.split(module, names, path)]


def from_canonical(adapter: Adapter, dialect: str) -> dict[str, torch.Tensor]:
    """The state dict of ``adapter`` in ``dialect`` (kohya, comfy, diffusers, peft, kohya_diffusers,
    diffusers_doubled, lycoris). Alpha dialects always get an explicit 0-d float32 ``.alpha`` (alpha = rank when the
    adapter has none); the others get alpha/rank folded into ``up``. LoHa, LoKr, full diffs, bias diffs, LoCon mid
    tensors and DoRA scales need an alpha (extended) dialect: others refuse them, naming the module, except that
    ``peft`` holds per-output-row DoRA as ``lora_magnitude_vector``. In extended dialects such DoRA (``dora_norm``
    "adapted") is an (out, 1) dora_scale, which this pack and LyCORIS render with the norm of W + ΔW; a warning
    says that stock ComfyUI renders it with the norm of W."""
    if dialect not in WRITABLE:
        raise BLoRAError(f"cannot write dialect {dialect!r}: choose one of {', '.join(WRITABLE)}")
    spec = BY_NAME[dialect]
    per_row = sum(m.dora_norm == "adapted" for m in adapter.modules.values())
    if per_row and spec.extended:
        log.warning("%s: %d per-output-row DoRA module(s) written as an (out, 1) dora_scale: B-LoRA, LyCORIS and PEFT "
                    "render it with the norm of W + ΔW, stock ComfyUI's LoraLoader with the norm of W (renders "
                    "differently)", adapter.source or "adapter", per_row)
    out: dict[str, torch.Tensor] = {}
    for path in sorted(adapter.modules):
        for key, module in module_units(spec, path, adapter.modules[path]):
            _check_holdable(spec, dialect, path, module)
            out.update(_module_tensors(spec, key, module))
    return out


def _check_holdable(spec: Dialect, dialect: str, path: str, module: ModuleAdapter) -> None:
    """Raise BLoRAError naming the module unless ``dialect`` can hold it."""
    plain = module.spec.plain
    magnitude = bool(spec.magnitude) and module.dora_norm == "adapted"  # per-row DoRA in a PEFT file
    dora = module.dora_scale is not None and not magnitude
    extra = [n for n in module.tensors if n not in plain] + (["dora_scale"] if dora else [])
    if spec.magnitude and plain and extra == ["dora_scale"]:
        raise BLoRAError(f"module {path!r} has an input-axis DoRA scale {tuple(module.dora_scale.shape)}: the "
                         f"{dialect} dialect holds DoRA only per output row (lora_magnitude_vector); write it "
                         f"as kohya or comfy")
    if not spec.extended and (not plain or extra):
        raise BLoRAError(f"module {path!r} is {module.kind}{' with ' + ', '.join(extra) if extra else ''}: "
                         f"the {dialect} dialect holds only plain LoRA; write it as kohya or comfy")


def _module_tensors(spec: Dialect, key: str, module: ModuleAdapter) -> dict[str, torch.Tensor]:
    names = module.spec.suffixes(spec.down_up)
    tensors = module.tensors if spec.alpha else module.spec.fold_scale(module.tensors, module.scale)
    out = {key + names[n]: v for n, v in tensors.items()}
    if spec.alpha and (module.rank or module.alpha is not None):  # a full LoKr has rank 0 and keeps its alpha
        alpha = float(module.rank) if module.alpha is None else float(module.alpha)
        out[key + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if module.dora_scale is not None and spec.magnitude:
        out[key + spec.magnitude] = module.dora_scale.reshape(-1)
    elif module.dora_scale is not None:
        out[key + ".dora_scale"] = module.dora_scale
    return out
