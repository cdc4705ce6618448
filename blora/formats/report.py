"""What an adapter holds, for the Load node (one line), its UI (a dict) and the CLI (several lines)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from ..adapters.adapter import Adapter, is_text_encoder
from ..arch import block_of
from ..adapters.kinds import KINDS
from ..train.loss_history import training_summary

KIND_NAMES = {name: kind.label for name, kind in KINDS.items()}


@dataclass(frozen=True)
class AdapterReport:
    """Summary of one adapter.

    roles: content/style/layout present; blocks: LBW slots (``OUT0``…) of the attention blocks touched, SDXL
    order; kinds: adapter kinds; ranks / alphas: distinct values (alpha None: the file stores none, scale 1);
    dtypes: tensor dtypes (``float16``…); unet_other: UNet modules outside attention blocks (resnets, embeddings);
    te_modules: text-encoder modules; unmapped: file keys that name no SDXL module (never applied);
    stock_differs: modules that stock LoraLoader renders differently from this pack and the file's home tool
    (per-output-row DoRA: PEFT's magnitude, which stock ignores, or an (out, 1) dora_scale, which stock normalises
    by ‖W‖ instead of ‖W + ΔW‖); training: steps and final loss of a file this pack trained
    (``loss_history.training_summary``), else ""; block_ranks: LBW slot -> mean rank of the block's modules in
    the file, when ranks differ between modules (AdaLoRA); architecture: the model family its modules belong to
    (blocks are then that architecture's slots: SDXL ``OUT1``, FLUX.1 ``S12`` / ``D03``).
    """

    source: str
    dialect: str
    roles: tuple[str, ...]
    blocks: tuple[str, ...]
    kinds: tuple[str, ...]
    ranks: frozenset[int]
    alphas: frozenset[float | None]
    dtypes: tuple[str, ...]
    num_params: int
    num_modules: int
    unet_other: int
    te_modules: int
    unmapped: tuple[str, ...]
    dora: bool
    trigger: str
    stock_differs: int = 0
    training: str = ""
    block_ranks: dict[str, float] = field(default_factory=dict)
    architecture: str = ""  # "SDXL", "FLUX.1" (blora.arch), "" for a text-encoder-only file

    def summary(self) -> str:
        """One line: ``kohya · content, style (OUT0 OUT1) · LoRA rank 64 · 160 modules · 28.2M params``."""
        where = ", ".join(self.roles) or "no B-LoRA role"
        blocks = f" ({' '.join(self.blocks)})" if self.blocks else ""
        dialect = f"{self.architecture} {self.dialect}" if self.architecture not in ("", "SDXL") else self.dialect
        parts = [dialect, where + blocks, f"{self._kinds()} {self._ranks()}".strip(),
                 f"{self.num_modules} modules", f"{_millions(self.num_params)} params"]
        if self.te_modules:
            parts.append(f"{self.te_modules} text-encoder modules")
        if self.unmapped:
            parts.append(f"{len(self.unmapped)} keys unmapped")
        if self.trigger:
            parts.append(f"trigger {self.trigger!r}")
        if self.stock_differs:
            parts.append(self._stock_note())
        if self.training:
            parts.append(self.training)
        return " · ".join(parts)

    def _stock_note(self) -> str:
        return (f"stock LoraLoader renders {self.stock_differs} DoRA modules differently (per-row norm: B-LoRA "
                f"renders them as PEFT/LyCORIS do)")

    def to_dict(self) -> dict:
        """JSON-able: sets become sorted lists (None alpha first, as null)."""
        d = asdict(self)
        d["ranks"] = sorted(self.ranks)
        d["alphas"] = sorted(self.alphas, key=lambda a: (a is not None, a or 0.0))
        for name in ("roles", "blocks", "kinds", "dtypes", "unmapped"):
            d[name] = list(d[name])
        return d

    def format(self) -> str:
        """Several lines, for the command line."""
        alphas = ", ".join("none (scale 1)" if a is None else f"{a:g}"
                           for a in sorted(self.alphas, key=lambda a: (a is not None, a or 0.0)))
        lines = [
            f"file:      {self.source or '(in memory)'}",
            f"dialect:   {self.dialect}",
            *([f"model:     {self.architecture}"] if self.architecture not in ("", "SDXL") else []),
            f"roles:     {', '.join(self.roles) or '-'}",
            f"blocks:    {' '.join(self.blocks) or '-'}",
            f"kinds:     {self._kinds()}{' + DoRA' if self.dora else ''}",
            f"ranks:     {', '.join(map(str, sorted(self.ranks))) or '-'}",
            *([f"per block: {', '.join(f'{k} {v:.1f}' for k, v in self.block_ranks.items())} (mean rank)"]
              if self.block_ranks else []),
            f"alpha:     {alphas or '-'}",
            f"dtypes:    {', '.join(self.dtypes)}",
            f"modules:   {self.num_modules} ({self.unet_other} outside attention blocks, "
            f"{self.te_modules} text encoder)",
            f"params:    {self.num_params:,}",
            f"trigger:   {self.trigger or '-'}",
            f"training:  {self.training or '-'}",
            f"unmapped:  {len(self.unmapped)}",
        ]
        if self.stock_differs:
            lines.insert(5, f"note:      {self._stock_note()}")
        lines += [f"  {k}" for k in self.unmapped[:10]]
        if len(self.unmapped) > 10:
            lines.append(f"  … and {len(self.unmapped) - 10} more")
        return "\n".join(lines)

    def _kinds(self) -> str:
        return "+".join(KIND_NAMES.get(k, k) for k in self.kinds) + (" DoRA" if self.dora else "")

    def _ranks(self) -> str:
        if not self.ranks:
            return ""
        if len(self.ranks) > 2 and self.block_ranks:  # a rank per module: its range and the mean per block
            per_block = " ".join(f"{slot} {r:.1f}" for slot, r in self.block_ranks.items())
            return f"rank {min(self.ranks)}–{max(self.ranks)} (mean per block {per_block})"
        return "rank " + "/".join(map(str, sorted(self.ranks)))


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def inspect_adapter(adapter: Adapter) -> AdapterReport:
    """The report of ``adapter`` (no tensor math beyond counting)."""
    modules = adapter.modules
    kinds = Counter(m.kind for m in modules.values())
    dtypes = {str(t.dtype).replace("torch.", "") for m in modules.values() for t in m.tensors.values()}
    unet = [p for p in modules if not is_text_encoder(p)]
    return AdapterReport(
        source=adapter.source, dialect=adapter.dialect or "-",
        roles=tuple(adapter.roles()), blocks=tuple(b.slot for b in adapter.blocks()),
        kinds=tuple(sorted(kinds)), ranks=frozenset(m.rank for m in modules.values() if m.rank),
        alphas=frozenset(m.alpha for m in modules.values() if m.rank),
        dtypes=tuple(sorted(dtypes)), num_params=adapter.num_params, num_modules=len(modules),
        unet_other=sum(1 for p in unet if block_of(p) is None), te_modules=len(modules) - len(unet),
        unmapped=tuple(adapter.unmapped), dora=any(m.dora_scale is not None for m in modules.values()),
        trigger=adapter.trigger, stock_differs=sum(m.dora_norm == "adapted" for m in modules.values()),
        training=training_summary(adapter.metadata), block_ranks=_block_ranks(adapter),
        architecture=adapter.architecture.title if adapter.architecture else "")


def _block_ranks(adapter: Adapter) -> dict[str, float]:
    """Mean rank per attention block (SDXL order) when the file's modules differ in rank; else empty."""
    if len({m.rank for m in adapter.modules.values()}) < 2:
        return {}
    ranks: dict[str, list[int]] = {}
    for path, module in adapter.modules.items():
        block = block_of(path)
        if block is not None and module.rank:
            ranks.setdefault(block.slot, []).append(module.rank)
    return {b.slot: sum(ranks[b.slot]) / len(ranks[b.slot]) for b in adapter.blocks() if b.slot in ranks}
