"""Command line: ``python -m blora inspect | split | merge | convert`` (no ComfyUI needed).

    python -m blora inspect FILE...                     what each file holds
    python -m blora split FILE --roles content,style    one file per role or block
    python -m blora merge --content A --style B -o OUT  content block from A, style block from B
    python -m blora convert FILE --to comfy -o OUT      another key dialect
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .adapters.adapter import merge, select
from .arch import resolve_blocks
from .formats.dialects import WRITABLE
from .errors import BLoRAError
from .formats.files import DTYPES, read_adapter, write_adapter
from .formats.report import inspect_adapter

def _inspect(args: argparse.Namespace) -> int:
    failed = 0
    for i, name in enumerate(args.files):
        try:
            report = inspect_adapter(read_adapter(name))
        except BLoRAError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps(report.to_dict()))
        else:
            print(("\n" if i else "") + report.format())
    return 1 if failed else 0


def _part_name(name: str, arch) -> str:
    blocks = resolve_blocks(name, arch)
    if len(blocks) > 1 or name.strip().lower() in (arch.roles if arch else {}):
        return name.strip().lower()  # a role or preset (FLUX content = single_blocks.0-9)
    block = blocks[0]
    if block.arch == "sdxl" and block.role:  # an SDXL role is one block: named by its role, as before FLUX
        return block.role
    return block.slot.lower()


def _split(args: argparse.Namespace) -> int:
    adapter = read_adapter(args.file)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.file).parent
    names = [n.strip() for n in args.roles.split(",") if n.strip()]
    if not names:
        raise BLoRAError("--roles is empty: name at least one role or block (content, style, layout, OUT1 ...)")
    parts = {}
    for name in names:
        arch = adapter.architecture
        part = select(adapter, [name])
        if not part.modules:
            blocks = resolve_blocks(name, arch)
            where = blocks[0].ldm if len(blocks) == 1 else f"{blocks[0].ldm} … {blocks[-1].ldm}"
            raise BLoRAError(f"{args.file}: holds no module in block {name!r} ({where})")
        parts[_part_name(name, arch)] = part
    stem = re.sub(r"\.safetensors$", "", Path(args.file).name, flags=re.I)
    for suffix, part in parts.items():
        print(write_adapter(part, out_dir, f"{stem}_{suffix}", dialect=args.format, dtype=DTYPES.get(args.dtype)))
    return 0


def _merge(args: argparse.Namespace) -> int:
    given = {role: getattr(args, role) for role in ("content", "style", "layout") if getattr(args, role)}
    if not given:
        raise BLoRAError("merge: give at least one of --content, --style, --layout")
    merged = merge({role: read_adapter(path) for role, path in given.items()})
    out = Path(args.output)
    print(write_adapter(merged, out.parent, out.name, dialect=args.format, dtype=DTYPES.get(args.dtype)))
    return 0


def _convert(args: argparse.Namespace) -> int:
    adapter = read_adapter(args.file)
    out = Path(args.output)
    print(write_adapter(adapter, out.parent, out.name, dialect=args.to, dtype=DTYPES.get(args.dtype)))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blora", description="Inspect, split, merge and convert B-LoRA and "
                                "SDXL / FLUX.1 LoRA files (safetensors, any key dialect).")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = dict(choices=WRITABLE, default="kohya", help="key dialect to write (default: kohya, what stock ComfyUI "
                                                        "and A1111 load)")
    dtype = dict(choices=sorted(DTYPES), default=None, help="cast tensors (default: keep)")

    s = sub.add_parser("inspect", help="print what each file holds", description="Print dialect, roles, blocks, "
                       "ranks, alpha, dtypes, parameter count and unmapped keys of each file.")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--json", action="store_true", help="one JSON object per file")
    s.set_defaults(run=_inspect)

    s = sub.add_parser("split", help="one file per role or block", description="Write one file per role or block "
                       "(FILE_<role>.safetensors), e.g. the content and style blocks of any SDXL LoRA.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--roles", required=True, help="comma list of roles or blocks: content,style,layout or any "
                   "block name (OUT1, output_blocks.1.1, up_blocks.0.attentions.1; FLUX.1: content, style, "
                   "boundary, single_blocks.12, S12, double_blocks.3)")
    s.add_argument("--out-dir", help="folder for the files (default: FILE's folder)")
    s.add_argument("--format", **fmt)
    s.add_argument("--dtype", **dtype)
    s.set_defaults(run=_split)

    s = sub.add_parser("merge", help="content from one file, style from another", description="One file holding "
                       "each role's block from its own source.")
    for role in ("content", "style", "layout"):
        s.add_argument(f"--{role}", metavar="FILE", help=f"file that gives the {role} block")
    s.add_argument("-o", "--output", required=True, help="file to write (.safetensors added if missing)")
    s.add_argument("--format", **fmt)
    s.add_argument("--dtype", **dtype)
    s.set_defaults(run=_merge)

    s = sub.add_parser("convert", help="rewrite in another key dialect", description="Rewrite a file in another "
                       "key dialect; round trips are exact.")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--to", required=True, choices=WRITABLE, help="target dialect")
    s.add_argument("-o", "--output", required=True, help="file to write (.safetensors added if missing)")
    s.add_argument("--dtype", **dtype)
    s.set_defaults(run=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except BLoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into head & co.
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
