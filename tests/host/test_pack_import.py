"""The pack loads as ComfyUI loads it (its package, then ``comfy_entrypoint`` and the node list) with every
standard module that one of Python 3.10-3.13 lacks made unimportable: loading it needs none of them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from blora_testkit.python_versions import NOT_ON_EVERY_SUPPORTED_PYTHON

ROOT = Path(__file__).resolve().parents[2]

LOAD = r"""
import asyncio, importlib.abc, importlib.util, sys
root, blocked = sys.argv[1], set(sys.argv[2].split(","))
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management, comfy.sd, comfy_api.latest, folder_paths  # the host first: only the pack is judged
before = set(sys.modules)

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in blocked or name.split(".")[0] in blocked:
            raise ImportError(f"the pack imported {name}, which some supported Python lacks")

sys.meta_path.insert(0, Blocked())
spec = importlib.util.spec_from_file_location("comfyui_blora", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules["comfyui_blora"] = pack
spec.loader.exec_module(pack)
extension = asyncio.run(pack.comfy_entrypoint())
nodes = asyncio.run(extension.get_node_list())
new = sorted(m for m in set(sys.modules) - before if m in blocked or m.split(".")[0] in blocked)
assert not new, new
print(len(nodes), "nodes")
"""


def test_pack_loads_without_modules_some_supported_python_lacks(comfy_host):
    blocked = ",".join(sorted(NOT_ON_EVERY_SUPPORTED_PYTHON))
    proc = subprocess.run([sys.executable, "-c", LOAD, str(ROOT), blocked], cwd=str(comfy_host), capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(comfy_host), "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    count = int(proc.stdout.split()[-2])
    assert count >= 8, proc.stdout


def test_the_blocker_catches_an_import(comfy_host):
    code = LOAD.replace("spec.loader.exec_module(pack)", "import tomllib; spec.loader.exec_module(pack)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), "tomllib"], cwd=str(comfy_host),
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(comfy_host), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "some supported Python lacks" in proc.stderr, proc.stderr[-2000:]
