"""Per-block strengths: the block-weights text of "B-LoRA Block Weights" and the strength modes of "Apply B-LoRA".

Text form: entries ``name=value`` separated by commas or newlines, ``#`` starts a comment, whitespace is free::

    content=1.0, OUT1=0.6, input_blocks.8.1=0.3
    output_blocks.0.1.transformer_blocks.3=0   # one transformer block of the content block off
    default=0                                  # every block not listed (default: 1.0)

A name is anything the adapter's architecture (``blora.arch``) resolves: a role or preset, an LBW slot, a host (LDM)
or diffusers block name (FLUX.1: ``single_blocks.12``, ``S12``, ``content`` = single_blocks.0-9), optionally followed
by a sub-path inside the block (SDXL ``.transformer_blocks.3.attn2.to_k``, FLUX ``.img_attn.qkv``, ``.linear1``).
For a module the most specific entry wins: a sub-path entry over its block's entry, a block named alone over a
role or preset covering it (FLUX roles span many blocks), any entry over ``default``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping

from ..adapters.adapter import Adapter, select
from .. import arch as architectures
from ..arch import Architecture, Block
from ..errors import BLoRAError, BlockNameError, ScheduleError

DEFAULT_KEY = "default"


STRENGTH_MODES: dict[str, Callable[[float], float]] = {
    "linear": lambda s: s,  # ComfyUI's strength: W + s·ΔW
    "alpha_squared": lambda s: s * abs(s),  # original B-LoRA scales up and down by s: effect s², sign kept
}


def effective_strength(strength: float, mode: str = "linear") -> float:
    """The linear (ComfyUI) strength that gives the effect of ``strength`` under ``mode`` (see STRENGTH_MODES)."""
    if mode not in STRENGTH_MODES:
        raise ScheduleError(f"unknown strength mode {mode!r}: choose one of {', '.join(STRENGTH_MODES)}")
    return float(STRENGTH_MODES[mode](float(strength)))


@dataclass(frozen=True)
class WeightEntry:
    """One ``name=value`` entry. block None means ``default``; sub_path '' means the whole block."""

    text: str
    position: str
    block: Block | None
    sub_path: str
    value: float
    group: bool = False  # from a role or preset naming several blocks: yields to an entry naming the block itself

    @property
    def prefix(self) -> str:
        """Canonical module-path prefix this entry covers ('' for default)."""
        if self.block is None:
            return ""
        return self.block.ldm + ("." + self.sub_path if self.sub_path else "")

    def covers(self, module_path: str) -> bool:
        if self.block is None:
            return True
        prefix = self.prefix
        return module_path == prefix or module_path.startswith(prefix + ".")


@dataclass(frozen=True)
class BlockWeights:
    """Parsed block weights: explicit entries plus the strength of everything unlisted."""

    entries: tuple[WeightEntry, ...] = ()
    default: float = 1.0

    def strength_for(self, module_path: str) -> float:
        """Strength of one canonical module path: the most specific entry covering it, else the default."""
        best = None
        for entry in self.entries:
            if entry.covers(module_path) and (best is None or (len(entry.prefix), not entry.group) >
                                              (len(best.prefix), not best.group)):
                best = entry
        return best.value if best is not None else self.default

    def unused(self, module_paths: Iterable[str]) -> list[WeightEntry]:
        """Entries that cover none of ``module_paths`` (e.g. a block the adapter does not touch)."""
        paths = list(module_paths)
        return [e for e in self.entries if not any(e.covers(p) for p in paths)]


def _split_entries(text: str) -> list[tuple[str, str]]:
    """(entry text, position) for each non-empty entry; comments stripped."""
    out = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0]
        for item_no, item in enumerate(line.split(","), start=1):
            if item.strip():
                out.append((item.strip(), f"line {line_no}, item {item_no}"))
    return out


def _resolve_name(name: str, entry: str, where: str,
                  arch: Architecture | None) -> tuple[tuple[Block, ...], str, bool]:
    """Blocks, sub-path and whether a role or preset named them: the longest dotted prefix that names blocks, the
    rest a sub-path."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        try:
            blocks = architectures.resolve_blocks(head, arch)
        except BlockNameError:
            continue
        sub_path = ".".join(parts[cut:]).lower()
        owner = architectures.get(blocks[0].arch)
        if sub_path and not owner.sub_path.match(sub_path):
            example = ("'transformer_blocks.3', 'transformer_blocks.3.attn2', 'transformer_blocks.3.attn2.to_k', "
                       "'proj_in'") if owner.name == "sdxl" else "'img_attn.qkv', 'linear1', 'txt_mlp.0'"
            raise BlockNameError(f"block weights {where}: {entry!r}: {sub_path!r} is not a module inside block "
                                 f"{blocks[0].ldm} (expected e.g. {example})")
        group = len(blocks) > 1  # an SDXL role is its one block: naming both is a duplicate, as before
        return blocks, sub_path, group
    try:
        architectures.resolve_blocks(name, arch)
    except BlockNameError as e:
        raise BlockNameError(f"block weights {where}: {entry!r}: {e}") from None
    raise AssertionError("unreachable")


def _parse_value(raw: str, entry: str, where: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ScheduleError(f"block weights {where}: {entry!r}: {raw.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ScheduleError(f"block weights {where}: {entry!r}: the strength must be a finite number")
    return value


def parse_block_weights(text: str, arch: Architecture | str | None = None) -> BlockWeights:
    """Parse block-weights text (see the module docstring) for ``arch`` (the adapter's architecture; None: names
    as SDXL knows them, FLUX block names too). Errors name the entry text and its position: ScheduleError for a
    malformed entry or duplicate, BlockNameError for a name no block answers to."""
    entries: list[WeightEntry] = []
    default, default_where = 1.0, None
    seen: dict[str, str] = {}
    for entry_text, where in _split_entries(text or ""):
        name, sep, raw = entry_text.partition("=")
        name = name.strip()
        if not sep or not name or not raw.strip():
            raise ScheduleError(f"block weights {where}: {entry_text!r}: expected 'name=value', "
                                f"e.g. 'style=0.8' or 'default=0'")
        value = _parse_value(raw, entry_text, where)
        if name.lower() == DEFAULT_KEY:
            if default_where is not None:
                raise ScheduleError(f"block weights {where}: {entry_text!r}: default given twice "
                                    f"(first at {default_where})")
            default, default_where = value, where
            continue
        blocks, sub_path, group = _resolve_name(name, entry_text, where, arch)
        for block in blocks:
            entry = WeightEntry(entry_text, where, block, sub_path, value, group)
            if (entry.prefix, group) in seen:
                raise ScheduleError(f"block weights {where}: {entry_text!r}: {entry.prefix} is already given at "
                                    f"{seen[entry.prefix, group]}")
            seen[entry.prefix, group] = where
            entries.append(entry)
    return BlockWeights(tuple(entries), default)


def role_parts(roles: Mapping[str, tuple[Adapter | None, float]], mode: str = "linear") -> list[tuple[Adapter, float]]:
    """(adapter, linear strength) parts for Apply B-LoRA: each role's block taken from its own adapter.

    roles: role -> (adapter or None, strength), e.g. {"content": (A, 1.0), "style": (B, 0.8)}. The role's blocks
    are those of the adapter's architecture (SDXL content: output_blocks.0.1; FLUX.1 content: single_blocks.0-9). A
    given adapter lacking its role's blocks, or of an architecture without that role, is an error naming the file
    and the role; absent adapters are left out."""
    parts = []
    for role, (adapter, strength) in roles.items():
        if adapter is None:
            continue
        arch = adapter.architecture or architectures.SDXL
        if role not in arch.roles:
            raise BLoRAError(f"{adapter.source or 'adapter'}: given as {role}, but {arch.title} has no {role} role "
                             f"(its roles: {', '.join(arch.roles)})")
        blocks = arch.resolve(role)
        part = select(adapter, blocks)
        if not part.modules:
            held = ", ".join(f"{b.slot} ({b.role or b.ldm})" for b in adapter.blocks()) or \
                f"no {arch.title} block"
            where = (f"{blocks[0].ldm}, {blocks[0].slot}" if len(blocks) == 1 else
                     f"{blocks[0].ldm} … {blocks[-1].ldm}, {arch.citation.split(':')[0]}")
            raise BLoRAError(f"{adapter.source or 'adapter'}: no {role} block ({where}) in this "
                             f"file, given as {role}; it holds {held}")
        parts.append((part, effective_strength(strength, mode)))
    return parts


def block_weight_parts(adapter: Adapter, weights: BlockWeights) -> list[tuple[Adapter, float]]:
    """Every module of ``adapter`` grouped by its strength under ``weights``: one (adapter, strength) part per
    distinct strength, in first-seen order (strength-0 modules included; the patcher skips them)."""
    groups: dict[float, dict] = {}
    for path, module in adapter.modules.items():
        groups.setdefault(weights.strength_for(path), {})[path] = module
    return [(replace(adapter, modules=modules), strength) for strength, modules in groups.items()]
