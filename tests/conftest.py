"""Test layers: tests/core (torch only, always), tests/host (real `comfy` in-process), tests/server (real
`main.py --cpu` subprocess). Host layers need ComfyUI: COMFYUI_PATH, or the pack sitting in
ComfyUI/custom_nodes/. Without it they skip, saying why."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PACK_MODULE = "comfyui_blora"


def find_comfyui() -> Path | None:
    """The ComfyUI checkout: $COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this pack."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if ROOT.parent.name == "custom_nodes":
        candidates.append(ROOT.parent.parent)
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    return None


HOST = find_comfyui()
NO_HOST_REASON = ("no ComfyUI host: set COMFYUI_PATH to a ComfyUI checkout (or install the pack in "
                  "ComfyUI/custom_nodes/) to run the host and server layers")


def _order_sys_path() -> None:
    # The host's own `nodes.py` must win over this pack's `nodes/` package, so the host goes first and the pack
    # root (for `import blora`) last; tests/ for the `blora_testkit` helpers.
    rest = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, HOST)]
    sys.path[:] = ([str(HOST)] if HOST else []) + rest + [str(ROOT), str(TESTS)]


_order_sys_path()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=NO_HOST_REASON)
    for item in items:
        layer = Path(str(item.fspath)).relative_to(TESTS).parts[0]
        if layer in ("host", "server"):
            item.add_marker(getattr(pytest.mark, layer))
            if HOST is None:
                item.add_marker(skip)


REQUIRE_ALL_LAYERS = os.environ.get("BLORA_REQUIRE_ALL_LAYERS") == "1"  # CI with hosts: a skip is a failure


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With BLORA_REQUIRE_ALL_LAYERS=1 (CI with the hosts) a skipped test is reported as failed, with its reason:
    every layer must run. xfail stays xfail."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL_LAYERS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, and BLORA_REQUIRE_ALL_LAYERS=1 makes every skip a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at collection (``pytest.importorskip`` at module level)."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL_LAYERS and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped at collection, and BLORA_REQUIRE_ALL_LAYERS=1 makes every skip a failure: {reason}"


def pytest_report_header(config):
    return f"comfyui host: {HOST}" if HOST else f"comfyui host: none ({NO_HOST_REASON})"


@pytest.fixture(scope="session")
def comfy_host() -> Path:
    """The host in-process on CPU (comfy.cli_args set before comfy.model_management is imported)."""
    if HOST is None:
        pytest.skip(NO_HOST_REASON)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401

    return HOST


@pytest.fixture(scope="session")
def pack(comfy_host):
    """The pack imported as ComfyUI imports it (a package named after its folder), sharing the `blora` core
    module objects with the tests."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    import blora

    spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    sys.modules[PACK_MODULE + ".blora"] = blora
    for name, mod in list(sys.modules.items()):
        if name.startswith("blora."):
            sys.modules[PACK_MODULE + "." + name] = mod
    spec.loader.exec_module(module)
    import importlib as _il

    _il.import_module(PACK_MODULE + ".nodes")
    return module


@pytest.fixture
def host_dirs(comfy_host, tmp_path, monkeypatch):
    """Fresh models/, output/, input/ and temp/ folders for one test (the host's folder_paths pointed at them)."""
    import folder_paths

    models = tmp_path / "models"
    for sub in ("loras", "blora", "checkpoints"):
        (models / sub).mkdir(parents=True)
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    for folder in ("loras", "blora"):
        exts = folder_paths.folder_names_and_paths.get(folder, ([], {".safetensors"}))[1]
        folder_paths.folder_names_and_paths[folder] = ([str(models / folder)], set(exts) or {".safetensors"})
    old_out, old_in = folder_paths.get_output_directory(), folder_paths.get_input_directory()
    old_temp = folder_paths.get_temp_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    for sub in ("output", "input", "temp"):
        (tmp_path / sub).mkdir()
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    yield tmp_path
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.set_output_directory(old_out)
    folder_paths.set_input_directory(old_in)
    folder_paths.set_temp_directory(old_temp)
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()


@pytest.fixture
def tiny_model(comfy_host):
    """A fresh tiny SDXL-architecture ModelPatcher (fp32, CPU, deterministic weights)."""
    from blora_testkit.tiny_sdxl import tiny_sdxl_model

    return tiny_sdxl_model(seed=0)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line per layer: how many tests ran, passed, failed and skipped (CI prints this)."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            parts = Path(str(report.nodeid).split("::")[0]).parts
            layer = parts[1] if len(parts) > 1 and parts[0] == "tests" else (parts[0] if parts else "?")
            counts.setdefault(layer, {}).setdefault(outcome, 0)
            counts[layer][outcome] += 1
    terminalreporter.write_sep("-", "blora test layers")
    for layer in sorted(counts):
        c = counts[layer]
        ran = c.get("passed", 0) + c.get("failed", 0) + c.get("error", 0)
        terminalreporter.write_line(f"layer {layer}: ran {ran} ({c.get('passed', 0)} passed, {c.get('failed', 0)} "
                                    f"failed, {c.get('error', 0)} errors), skipped {c.get('skipped', 0)}")
    if HOST is None and any(counts.get(layer, {}).get("skipped") for layer in ("host", "server", "browser")):
        terminalreporter.write_line(f"host and server layers skipped: {NO_HOST_REASON}")
    counts_file = os.environ.get("BLORA_COUNTS_FILE")
    if counts_file:  # .ci/run adds these up over hosts
        total = {k: sum(c.get(k, 0) for c in counts.values()) for k in ("passed", "failed", "error", "skipped")}
        Path(counts_file).write_text(" ".join(f"{k}={v}" for k, v in total.items()) + f" exit={int(exitstatus)}\n")
