"""The server layer's start-up check counts the pack's own import failures and nothing else (issue 19: the host's
own torchaudio failures, under a venv cache whose path held the pack's name, were blamed on the pack)."""
from __future__ import annotations

from blora_testkit.startup_log import pack_failure_lines

BASE = "/tmp/blora-server-x1/custom_nodes/comfyui-blora"
REPO = "/work/clone/main"
DIRS = (BASE, REPO)
CACHE_HOST = "/root/.cache/comfyui-blora/hosts/0.3.64/ComfyUI"

HOST_AUDIO_FAILURE = f"""\
Traceback (most recent call last):
  File "{CACHE_HOST}/nodes.py", line 2131, in load_custom_node
    module_spec.loader.exec_module(module)
  File "{CACHE_HOST}/comfy_extras/nodes_audio.py", line 4, in <module>
    import torchaudio
ModuleNotFoundError: No module named 'torchaudio'

Cannot import {CACHE_HOST}/comfy_extras/nodes_audio.py module for custom nodes: No module named 'torchaudio'
Cannot import {CACHE_HOST}/comfy_extras/nodes_audio_encoder.py module for custom nodes: No module named 'torchaudio'
WARNING: some comfy_extras/ nodes did not import correctly. This may be because they are missing some dependencies.
IMPORT FAILED: nodes_audio.py
IMPORT FAILED: nodes_audio_encoder.py
Import times for custom nodes:
   0.0 seconds: /tmp/blora-server-x1/custom_nodes/blora_tiny_host
   0.4 seconds: {BASE}
"""

PACK_FAILURE = f"""\
Traceback (most recent call last):
  File "{CACHE_HOST}/nodes.py", line 2131, in load_custom_node
    module_spec.loader.exec_module(module)
  File "{BASE}/__init__.py", line 12, in <module>
    from .nodes import NODES
ImportError: cannot import name 'NODES' from 'nodes'

Cannot import {BASE} module for custom nodes: cannot import name 'NODES' from 'nodes'
Import times for custom nodes:
   0.0 seconds: /tmp/blora-server-x1/custom_nodes/blora_tiny_host
   0.1 seconds (IMPORT FAILED): {BASE}
"""


def test_host_module_failures_under_a_path_holding_the_pack_name_are_not_the_packs():
    assert "comfyui-blora" in HOST_AUDIO_FAILURE.split("Import times")[0]  # the trap: a substring match fires
    assert pack_failure_lines(HOST_AUDIO_FAILURE, DIRS, "comfyui-blora") == []


def test_pack_import_failure_is_counted_in_each_form_the_host_prints():
    lines = pack_failure_lines(PACK_FAILURE, DIRS, "comfyui-blora")
    assert len(lines) == 3, lines
    assert any(line.startswith("Cannot import") for line in lines)
    assert any("IMPORT FAILED" in line for line in lines)
    assert any(line.strip().startswith('File "') for line in lines)


def test_failure_in_the_repository_the_pack_links_to_and_by_module_name():
    log = (f'  File "{REPO}/blora/formats/keys.py", line 3, in <module>\n'
           "Error while calling comfy_entrypoint in custom_nodes.comfyui-blora: boom\n")
    assert len(pack_failure_lines(log, DIRS, "comfyui-blora")) == 2


def test_a_sibling_directory_whose_name_extends_the_packs_is_not_the_pack():
    log = (f"Cannot import {BASE}-extra module for custom nodes: x\n"
           f'  File "{REPO}2/blora/formats/keys.py", line 3\n'
           "Error while calling comfy_entrypoint in custom_nodes.comfyui-blora-extra: boom\n")
    assert pack_failure_lines(log, DIRS, "comfyui-blora") == []
