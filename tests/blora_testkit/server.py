"""A real ComfyUI server (``main.py --cpu``) in a subprocess, with this pack and the tiny test checkpoint.

    with ComfyServer() as srv:                      # temp base dir, free loopback port, waits for /object_info
        prompt_id = srv.queue(graph)                # POST /prompt (API format)
        messages = srv.wait(prompt_id, timeout=60)  # websocket messages of that prompt, until it finished
        srv.history(prompt_id)["outputs"]

The base directory holds models/{checkpoints,loras,blora} (the tiny SDXL checkpoint as ``srv.ckpt_name``, the tiny
FLUX.1 single-file checkpoint as ``srv.flux_ckpt_name``),
custom_nodes/comfyui-blora (a symlink to this repository) and custom_nodes/blora_tiny_host (the TEST-ONLY node
that teaches the host the tiny checkpoint), input/, output/ and server.log. Only loopback traffic; every wait
is bounded. Failures carry the tail of the server log.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .tiny_checkpoint import cached_tiny_checkpoint
from .workflows import message_types
from .ws_listener import WsListener

ROOT = Path(__file__).resolve().parents[2]
TINY_HOST_NODE = Path(__file__).resolve().parent / "tiny_host_node"
PACK_DIR_NAME = "comfyui-blora"
CKPT_NAME = "tiny_sdxl.safetensors"
FLUX_CKPT_NAME = "tiny_flux.safetensors"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(AssertionError):
    """The server failed to start, died, or did not answer in time (message ends with the log tail)."""


class PromptRejected(AssertionError):
    """POST /prompt answered an error (validation). ``status`` and ``body`` hold the answer."""

    def __init__(self, message: str, status: int, body):
        super().__init__(message)
        self.status = status
        self.body = body


def find_host() -> Path | None:
    """$COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this repository."""
    for c in ([Path(os.environ["COMFYUI_PATH"])] if os.environ.get("COMFYUI_PATH") else []) + [ROOT.parent.parent]:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI server process; use as a context manager (or ``start()`` / ``stop()``).

    ``extra_model_paths``: the content of an extra_model_paths.yaml (relative paths resolve against the base
    dir); ``extra_args``: more main.py flags (e.g. ``("--cache-none",)``); ``env``: extra environment
    variables for the server process; ``keep_dir`` (or the environment
    variable BLORA_KEEP_SERVER_DIR=1) keeps the base dir and its server.log after ``stop()``."""

    def __init__(self, host: Path | str | None = None, *, base_dir: Path | str | None = None,
                 checkpoint: Path | str | None = None, extra_model_paths: dict | None = None,
                 extra_args: tuple[str, ...] = (), env: dict | None = None, startup_timeout: float = 120.0,
                 keep_dir: bool = False):
        self.host = Path(host) if host else find_host()
        if self.host is None:
            raise ServerError("no ComfyUI host: set COMFYUI_PATH")
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="blora-server-"))
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.extra_model_paths = extra_model_paths
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.keep_dir = keep_dir or bool(os.environ.get("BLORA_KEEP_SERVER_DIR"))
        self.port = 0
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._ws: WsListener | None = None

    # -- paths ---------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def ckpt_name(self) -> str:
        return CKPT_NAME

    @property
    def flux_ckpt_name(self) -> str:
        return FLUX_CKPT_NAME

    # -- lifecycle -----------------------------------------------------------------------------------------
    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _prepare_base_dir(self) -> None:
        for sub in ("models/checkpoints", "models/loras", "models/blora", "custom_nodes", "input", "output"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for name, build in ((CKPT_NAME, lambda: self.checkpoint or cached_tiny_checkpoint(self.host)),
                            (FLUX_CKPT_NAME, lambda: cached_tiny_checkpoint(self.host, kind="flux"))):
            target = self.models_dir / "checkpoints" / name
            if not target.exists():  # a copy, so nothing a test does can touch the shared cache
                shutil.copyfile(build(), target)
        for name, src in ((PACK_DIR_NAME, ROOT), ("blora_tiny_host", TINY_HOST_NODE)):
            link = self.base_dir / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(src, target_is_directory=True)

    def command(self) -> list[str]:
        cmd = [sys.executable, str(self.host / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
               str(self.port), "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes"]
        if importlib.util.find_spec("comfyui_frontend_package") is None:
            frontend = self.base_dir / "frontend"
            frontend.mkdir(exist_ok=True)
            (frontend / "index.html").write_text("<html></html>")
            cmd += ["--front-end-root", str(frontend)]
        if self.extra_model_paths:
            import yaml

            config = self.base_dir / "extra_model_paths.yaml"
            config.write_text(yaml.safe_dump(self.extra_model_paths))
            cmd += ["--extra-model-paths-config", str(config)]
        return cmd + list(self.extra_args)

    def start(self) -> "ComfyServer":
        """Prepare the base dir, launch the server, wait for /object_info, connect the websocket."""
        self._prepare_base_dir()
        # one intra-op thread unless the caller says otherwise: the tiny model gains nothing from more, and on a
        # busy 2-core machine OpenMP's spinning threads made a 3-step sample 20-40x slower
        env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1", **self.env}
        self._log = open(self.log_path, "ab")
        try:
            for attempt in range(3):  # another process may take the free port before the server binds it
                self.port = free_port()
                self.proc = subprocess.Popen(self.command(), cwd=str(self.host), env=env, stdin=subprocess.DEVNULL,
                                             stdout=self._log, stderr=subprocess.STDOUT)
                try:
                    self._wait_ready()
                    break
                except ServerError:
                    if attempt == 2 or "address already in use" not in self.log_tail(30).lower():
                        raise
            self._ws = WsListener(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}")
            self._ws.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode} while starting{self.log_context()}")
            try:
                status, _ = self.request("GET", "/object_info", timeout=10)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise ServerError(f"server not ready after {self.startup_timeout:.0f} s{self.log_context()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server (kill after ``timeout``), close the websocket; remove the temp base dir
        unless ``keep_dir``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._ws is not None:
            self._ws.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir and not self.keep_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- websocket -----------------------------------------------------------------------------------------
    def messages(self, prompt_id: str) -> list[dict]:
        """Websocket messages received so far for one prompt (in order)."""
        return self._ws.messages(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 60.0) -> list[dict]:
        """Block until the prompt finished (success, error or interrupt); its websocket messages, in order:
        execution_start, executing, progress, executed, execution_error / execution_success / execution_interrupted,
        and custom events sent while it ran (e.g. "blora.train.progress"). ServerError on timeout or death."""
        try:
            return self._ws.wait(prompt_id, timeout, alive=lambda: self.proc.poll() is None)
        except (TimeoutError, RuntimeError) as err:
            raise ServerError(f"{err}{self.log_context()}") from None

    # -- HTTP ----------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30.0):
        """(status, parsed JSON or text) of one loopback request; HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with _NO_PROXY.open(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def post_prompt(self, prompt: dict):
        """POST /prompt; (status, answer) without raising."""
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})

    def queue(self, prompt: dict) -> str:
        """Queue an API-format graph; its prompt_id. PromptRejected (with the answer) when validation fails."""
        status, body = self.post_prompt(prompt)
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise PromptRejected(f"/prompt answered {status}: {json.dumps(body)[:4000]}{self.log_context(40)}",
                                 status, body)
        return body["prompt_id"]

    def run(self, prompt: dict, timeout: float = 60.0, expect_success: bool = True) -> tuple[str, list[dict]]:
        """queue + wait; with ``expect_success`` an AssertionError (error message + log tail) unless the
        prompt ended with execution_success."""
        prompt_id = self.queue(prompt)
        messages = self.wait(prompt_id, timeout)
        if expect_success and "execution_success" not in message_types(messages):
            errors = [m["data"] for m in messages if m.get("type") == "execution_error"]
            raise AssertionError(f"prompt {prompt_id} did not succeed: {json.dumps(errors)[:4000]}{self.log_context()}")
        return prompt_id, messages

    def history(self, prompt_id: str) -> dict:
        """The /history entry of one prompt ({} when unknown): prompt, outputs, status, meta."""
        status, body = self.request("GET", f"/history/{prompt_id}")
        if status != 200:
            raise ServerError(f"/history answered {status}: {body}{self.log_context(20)}")
        return body.get(prompt_id, {}) if isinstance(body, dict) else {}

    def output_files(self, prompt_id: str, types: tuple[str, ...] = ("output",)) -> list[Path]:
        """Files the prompt's nodes reported in their UI output (images, latents...), of the given types
        ("output": the output folder; "temp": PreviewImage's temp folder)."""
        return [f for files in self.outputs_by_node(prompt_id, types).values() for f in files]

    def outputs_by_node(self, prompt_id: str, types: tuple[str, ...] = ("output", "temp")) -> dict[str, list[Path]]:
        """{node id: [file paths]} from the prompt's /history outputs."""
        roots = {"output": self.output_dir, "temp": self.base_dir / "temp"}
        found: dict[str, list[Path]] = {}
        for node_id, node_out in self.history(prompt_id).get("outputs", {}).items():
            for items in node_out.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and item.get("type") in types and "filename" in item:
                        found.setdefault(node_id, []).append(
                            roots[item["type"]] / item.get("subfolder", "") / item["filename"])
        return found

    def object_info(self, node_id: str | None = None) -> dict:
        status, body = self.request("GET", "/object_info" + (f"/{node_id}" if node_id else ""))
        if status != 200:
            raise ServerError(f"/object_info answered {status}{self.log_context(20)}")
        return body

    def interrupt(self) -> None:
        self.request("POST", "/interrupt", {})

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    # -- logs ----------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_context(self, lines: int = 80) -> str:
        """The log tail as an assertion-message suffix."""
        return f"\n--- server log tail ({self.log_path}) ---\n{self.log_tail(lines)}"
