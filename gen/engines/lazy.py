"""The engine a run uses: built on its first request, in a thread, and ended cleanly even
when the run is stopped while the build is still under way."""
from __future__ import annotations

import asyncio
import multiprocessing
import threading
from typing import Any, Optional

from gen.engines.base import Completion, Engine


class LazyEngine(Engine):
    """Builds the real engine on the first request: a fully cached rerun starts no model.

    The build runs in a thread: vLLM's start-up takes minutes, and a loop blocked that long
    would not see SIGTERM. Stopped during the build, it ends the processes the build had
    started (vLLM's engine core), which would otherwise outlive capgen.
    """

    def __init__(self, build):
        self.build, self.inner = build, None
        self.name = "lazy"
        self._lock: Optional[asyncio.Lock] = None
        self._children_before: Optional[set] = None  # set while building

    async def complete(self, messages, schema=None) -> Completion:
        if self.inner is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self.inner is None:
                    self._children_before = set(multiprocessing.active_children())
                    self.inner = await _in_daemon_thread(self.build)
                    self._children_before = None
        return await self.inner.complete(messages, schema)

    def checked(self, done: Completion, valid: bool) -> bool:
        return self.inner is not None and self.inner.checked(done, valid)

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()
        elif self._children_before is not None:
            await asyncio.to_thread(_end_processes,
                                    set(multiprocessing.active_children()) - self._children_before)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe() if self.inner else {"engine": None, "note": "no request needed"}


def _in_daemon_thread(fn) -> "asyncio.Future":
    """Run fn in a daemon thread. Not asyncio.to_thread: once the engine core is killed under
    it, vLLM's start-up can wait for a handshake that never comes, and asyncio.run joins its
    executor's threads on the way out, so a stopped run would hang there instead of exiting."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: nobody waits for this build any more
            pass

    threading.Thread(target=work, name="capgen-engine-build", daemon=True).start()
    return future


def _end_processes(started: set) -> None:
    """End what an engine build started: vLLM's engine core finishes loading the model before
    it honours SIGTERM (minutes on a CPU), so it gets a few seconds, then SIGKILL, and so do
    the workers it spawned, which would otherwise run on without a parent."""
    try:
        import psutil  # vLLM's dependency: present whenever vLLM is
        below = [d for c in started for d in psutil.Process(c.pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - no psutil, or a child already gone: end what we can
        below = []
    for child in started:
        child.terminate()
    for child in started:
        child.join(5)
        if child.is_alive():
            child.kill()
    for proc in below:
        try:
            proc.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
