"""Safetensors metadata of adapter files: the trigger token a file announces, and what this pack writes."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Mapping

from ..errors import BLoRAError

FORMAT = "comfyui-blora 1"

# Metadata keys that name the trigger, most specific first (this pack, modelspec, trainers' own keys).
TRIGGER_KEYS = ("blora.trigger", "modelspec.trigger_phrase", "trigger_phrase", "ss_instance_prompt",
                "instance_prompt", "trigger_word", "trigger", "activation_text")
# Source metadata that must not follow the tensors into a rewritten file (it describes scaling or is ours).
DROPPED_ON_WRITE = ("lora_adapter_metadata",)


def trigger_of(metadata: Mapping[str, str]) -> str:
    """The trigger token a file's metadata gives: the first of TRIGGER_KEYS that is set, else the most frequent
    tag of kohya's ``ss_tag_frequency`` (``{"dir": {"tag": count}}``), else ""."""
    for key in TRIGGER_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return _top_tag(metadata.get("ss_tag_frequency"))


def _top_tag(raw: str | None) -> str:
    try:
        table = json.loads(raw) if raw else {}
    except ValueError:
        return ""
    counts: Counter[str] = Counter()
    for tags in table.values() if isinstance(table, dict) else ():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                if isinstance(n, (int, float)):
                    counts[tag.strip()] += n
    counts.pop("", None)
    if not counts:
        return ""
    best = max(counts.values())
    return min(tag for tag, n in counts.items() if n == best)  # ties: alphabetical, so the result is stable


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def written_metadata(adapter, dialect: str, stores_alpha: bool,
                     extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Metadata for writing ``adapter`` in ``dialect``: the source file's metadata (less DROPPED_ON_WRITE and old
    ``blora.*`` keys), then this pack's ``blora.*`` keys, then ``extra``. Values must all be str."""
    meta = {k: v for k, v in adapter.metadata.items()
            if k not in DROPPED_ON_WRITE and not k.startswith("blora.") and isinstance(v, str)}
    modules = adapter.modules.values()
    ranks = sorted({m.rank for m in modules if m.rank})
    alphas = sorted({(m.alpha if m.alpha is not None and stores_alpha else m.rank) for m in modules if m.rank})
    sources = adapter.metadata.get("blora.sources") or (Path(adapter.source).name if adapter.source else "")
    meta.update({
        "blora.format": FORMAT,
        "blora.roles": ",".join(adapter.roles()),
        "blora.blocks": ",".join(b.slot for b in adapter.blocks()),
        "blora.rank": ",".join(str(r) for r in ranks),
        "blora.alpha": ",".join(_number(a) for a in alphas),
        "blora.dialect": dialect,
        "blora.trigger": adapter.trigger,
        "blora.sources": sources,
    })
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BLoRAError(f"metadata must map str to str: {key!r} -> {type(value).__name__}")
        meta[key] = value
    return meta
