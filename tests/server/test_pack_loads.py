"""The pack loads in a real server: every node registered with category, description and tooltips; no import
error; the ``blora`` model folder registered without losing extra_model_paths.yaml entries."""
from __future__ import annotations

import importlib
import re

from blora_testkit.loras import ROLE_BLOCKS, attention_shapes, make_pairs, write_kohya
from blora_testkit.server import PACK_DIR_NAME, ROOT
from blora_testkit.startup_log import pack_failure_lines

# base_path is relative to the yaml file, which the harness writes into the server's base directory
SERVER_OPTIONS = {"extra_model_paths": {"testkit_extra": {"base_path": "extra", "blora": "adapters"}}}
KNOWN_IDS = {"BLoRALoader", "BLoRAApply", "BLoRABlockWeights", "BLoRATrain", "BLoRASave", "BLoRAMerge",
             "KLoRAFuse", "BLoRASchedule"}


def pack_node_ids(pack) -> list[str]:
    nodes = importlib.import_module(f"{pack.__name__}.nodes")
    return [cls.GET_SCHEMA().node_id for cls in nodes.NODES]


def _combo_options(spec: list) -> list:
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])


def test_pack_imports_without_error(server):
    """No start-up line reports an import failure at the pack's own location (blora_testkit.startup_log: the host's
    own failing modules do not count, whatever their path holds)."""
    log = server.log_text().split("Starting server")[0]  # start-up only
    pack_dirs = (server.base_dir / "custom_nodes" / PACK_DIR_NAME, ROOT)
    bad = pack_failure_lines(log, [str(p) for p in pack_dirs], PACK_DIR_NAME)
    assert not bad, "\n".join(bad) + server.log_context()
    assert re.search(rf"seconds: .*custom_nodes/{PACK_DIR_NAME}\s*$", log, re.M), server.log_context()


def test_every_pack_node_is_registered_and_documented(server, pack):
    ids = pack_node_ids(pack)
    assert ids and set(ids) & KNOWN_IDS, ids
    info = server.object_info()
    served = {k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_DIR_NAME}"}
    assert served == set(ids), f"server lists {sorted(served)}, the pack's NODES {sorted(ids)}"
    problems = []
    for node_id in ids:
        node = info[node_id]
        if not node.get("category", "").startswith("B-LoRA"):
            problems.append(f"{node_id}: category {node.get('category')!r}")
        if not node.get("description", "").strip():
            problems.append(f"{node_id}: no description")
        if not node.get("display_name") or node["display_name"] == node_id:
            problems.append(f"{node_id}: no display name")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                if len(spec) < 2 or not str(spec[1].get("tooltip", "")).strip():
                    problems.append(f"{node_id}.{name}: no tooltip")
        tips = node.get("output_tooltips") or []
        if len(tips) != len(node["output"]) or not all(t and t.strip() for t in tips):
            problems.append(f"{node_id}: output tooltips {tips}")
    assert not problems, "\n".join(problems)


def test_blora_folder_lists_models_blora_loras_and_extra_paths(server):
    shapes = attention_shapes(server.models_dir / "checkpoints" / server.ckpt_name)
    pairs = make_pairs(shapes, [ROLE_BLOCKS["style"]], seed=3)
    extra = server.base_dir / "extra" / "adapters"
    extra.mkdir(parents=True, exist_ok=True)
    for folder, name in ((server.models_dir / "blora", "in_blora.safetensors"),
                         (server.models_dir / "loras", "in_loras.safetensors"), (extra, "in_extra.safetensors")):
        write_kohya(folder / name, pairs)
    status, folder_files = server.request("GET", "/models/blora")
    assert status == 200 and {"in_blora.safetensors", "in_extra.safetensors"} <= set(folder_files), folder_files
    options = set(_combo_options(server.object_info("BLoRALoader")["BLoRALoader"]["input"]["required"]["lora_name"]))
    assert {"in_blora.safetensors", "in_loras.safetensors", "in_extra.safetensors"} <= options, sorted(options)
    assert "Adding extra search path blora" in server.log_text()


def test_test_only_host_node_stays_out_of_the_pack():
    """The tiny-checkpoint custom node lives in tests/ only; nothing the pack ships refers to it."""
    shipped = [p for p in ROOT.rglob("*.py") if not {"tests", "bench", ".git"} & set(p.relative_to(ROOT).parts)]
    leaks = [str(p) for p in shipped if re.search(r"tiny_host_node|TINY_TESTKIT|blora_testkit", p.read_text())]
    assert not leaks, leaks
