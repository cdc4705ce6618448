"""The server's websocket (/ws?clientId=...) read on a background thread into a per-prompt message log
(TEST-ONLY; aiohttp's client, loopback only)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Callable

UNATTRIBUTED = ("status", "feature_flags")


class WsListener:
    """Collects every JSON message; ``wait(prompt_id)`` blocks until that prompt finished.

    A message belongs to the prompt named in its data; one without a prompt_id (a custom event such as
    "blora.train.progress") belongs to the prompt running at the time. A prompt has finished when the server
    sends ``executing`` with node None for it: ComfyUI sends that after writing the history entry."""

    def __init__(self, url: str):
        self.url = url
        self._cond = threading.Condition()
        self._messages: list[tuple[str | None, dict]] = []
        self._finished: set[str] = set()
        self._current: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)), name="comfy-ws", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self.error is not None:
            raise ConnectionError(f"websocket {self.url} did not connect: {self.error!r}")

    def stop(self, timeout: float = 10.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed in between: the reader has ended already
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    async def _main(self, ready: threading.Event) -> None:
        import aiohttp

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
                ready.set()
                await self._read(ws, aiohttp.WSMsgType)
        except Exception as exc:  # the reader ends; a waiter then times out, with the server log
            self.error = exc
        finally:
            ready.set()

    async def _read(self, ws, kinds) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                receive = asyncio.ensure_future(ws.receive())
                await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    return
                msg = receive.result()
                if msg.type == kinds.TEXT:
                    self.add(json.loads(msg.data))
                elif msg.type in (kinds.CLOSE, kinds.CLOSED, kinds.ERROR):
                    return
        finally:
            stop.cancel()

    def add(self, msg: dict) -> None:
        data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
        kind, pid = msg.get("type"), data.get("prompt_id")
        with self._cond:
            if kind == "execution_start":
                self._current = pid
            if pid is None and kind not in UNATTRIBUTED:
                pid = self._current
            self._messages.append((pid, msg))
            if kind == "executing" and data.get("node") is None and pid is not None:
                self._finished.add(pid)
                self._current = None
            self._cond.notify_all()

    def messages(self, prompt_id: str) -> list[dict]:
        with self._cond:
            return [m for pid, m in self._messages if pid == prompt_id]

    def wait(self, prompt_id: str, timeout: float, alive: Callable[[], bool]) -> list[dict]:
        """The prompt's messages once it finished; TimeoutError after ``timeout`` s, RuntimeError as soon as
        ``alive()`` is false."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while prompt_id not in self._finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [m.get("type") for p, m in self._messages if p == prompt_id]
                    raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s; messages: {kinds}")
                if not alive():
                    raise RuntimeError(f"server died while running prompt {prompt_id}")
                self._cond.wait(min(left, 0.5))
            return [m for pid, m in self._messages if pid == prompt_id]
