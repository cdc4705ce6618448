"""bench/gpu_bench.py end to end on the CPU at toy size (the tiny test model, 64 px): every variant it measures on
a GPU runs and reports figures, so the script is ready when a GPU is lent."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIGURES = re.compile(r"^  (?P<name>.+?)\s+(?P<step>\d+\.\d+) s/step  1000 steps\s+\d+\.\d min  peak\s+\d+\.\d+ ")


def test_gpu_bench_runs_every_variant_at_toy_size_on_the_cpu(comfy_host, tmp_path):
    out = tmp_path / "RESULTS-gpu-train.txt"
    env = dict(os.environ, COMFYUI_PATH=str(comfy_host), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--device", "cpu", "--toy",
                           "--host-depths", "1", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "No GPU run has happened yet" in text and "[dynamic: dynamic VRAM off (unavailable: " in text
    measured = {m["name"]: float(m["step"]) for m in map(FIGURES.match, text.splitlines()) if m}
    expected = [f"ours, {mode}{offload}" for offload in ("", ", offload")
                for mode in ("off", "trained blocks", "all above")]
    expected += ["minimal loop, no checkpointing", "minimal loop, trained blocks checkpointed",
                 "host TrainLoraNode, bypass off, checkpoint_depth 1"]
    from comfy_extras import nodes_train

    execute = getattr(nodes_train.TrainLoraNode, "execute", None)
    if execute is not None and "bypass_mode" in inspect.signature(execute).parameters:  # 0.33+
        expected.append("host TrainLoraNode, bypass on, checkpoint_depth 1")
    else:  # 0.3.64: said so, the rest measured
        assert "bypass on, checkpoint_depth 1          failed: RuntimeError: this host's TrainLoraNode has no " in text
    assert sorted(measured) == sorted(expected) and all(v > 0 for v in measured.values()), text
    for line in ("ratio ours (trained blocks) / minimal loop without checkpointing:", "offload cost (off): step",
                 "ratio ours (default) / host TrainLoraNode bypass off"):
        assert line in text, text
    table = [ln.split() for ln in text.splitlines() if re.match(r"^\s+(64|128)\s+\d", ln)]
    assert [row[0] for row in table] == ["64", "128"] and all(len(row) == 4 for row in table), text
