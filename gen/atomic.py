"""File helpers: write-then-rename, so a crash never leaves a file that looks complete but is
not; groups of renames that a stop signal cannot split, and the stop signals themselves (kept
through Ray's start-up, which replaces their handlers); and the sha256 of a file's content,
read in blocks."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional


def _umask() -> int:
    # Only os.umask() reads it, by setting it; /proc says it without that brief change.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yields a temporary path beside `target`; renamed onto it only if the block succeeds.
    The file gets the mode open() would give it: mkstemp's 0600 would hide every output
    from the other accounts (a trainer's) that the umask lets read it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


class _Held:
    depth = 0
    signal: Optional[BaseException] = None
    stopping = False       # a stop signal came; later ones are the same request
    installed = 0          # depth of stop_signals()


# What schedulers, terminals and a closed SSH session send.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def init_ray_keeping_stop_handlers(ray) -> None:
    """ray.init replaces the stop-signal handlers (gen.run's: stop cleanly, exit 143) with its
    own, and its core's handler aborts the process on SIGTERM (exit -6, actors left to Ray):
    put back the ones in place before."""
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        # The workers' output (actors' vLLM included) comes to this process, whose output goes to
        # <out>/engine.log as a local run's engine output does (-v: the terminal).
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in handlers.items():
                if handler is not None:
                    signal.signal(s, handler)


class Terminated(KeyboardInterrupt):
    """A stop signal. A KeyboardInterrupt, so that asyncio lets it out of the loop at once and
    cancels the rest, running every `finally` (engine shut down, partial files removed)."""


def raise_unless_held(exc: BaseException) -> None:
    """For a stop-signal handler: raise exc now or, inside all_or_none(), once that is done."""
    if _Held.depth:
        _Held.signal = _Held.signal or exc
        return
    raise exc


@contextlib.contextmanager
def all_or_none() -> Iterator[None]:
    """Renames that belong together (a run's queries, captions and rejects): a SIGTERM that
    arrives between two of them waits until all are done, or a reader would find new
    queries beside old captions."""
    _Held.depth += 1
    held = None
    try:
        yield
    finally:
        _Held.depth -= 1
        if _Held.depth == 0:
            held, _Held.signal = _Held.signal, None
    if held is not None:   # the block ended normally; the stop it held goes on now
        raise held


def on_stop_signal(signum, frame) -> None:
    """The handler for STOP_SIGNALS: raises Terminated where the main thread is, once. A
    second Ctrl-C 50 ms later lands in the clean-up the first one started; raised there it
    left temporary files and a traceback behind."""
    if _Held.stopping:
        return
    _Held.stopping = True
    _quiet_finalizers()
    raise_unless_held(Terminated(signal.Signals(signum).name))


def _quiet_finalizers() -> None:
    """Terminated is raised wherever the main thread is, inside a library's constructor too;
    an object left half-built then fails in its __del__ when collected ("Exception ignored
    in ...", "coroutine ... was never awaited"), after the stop line. That is noise of the
    stop, not news: logged at debug, never printed, so a JSON log stays JSON to its end."""
    log = logging.getLogger("gen.stop")

    def hook(unraisable) -> None:
        log.debug("after the stop: %s in %s", unraisable.exc_type.__name__,
                  getattr(type(unraisable.object), "__qualname__", "?"))

    sys.unraisablehook = hook
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def stop_signalled() -> bool:
    """Whether a stop signal came since the handlers were installed. Terminated raised inside
    a Python callback that native code runs (polars' readers) comes back as that library's
    own error, a pyo3 PanicException; the caller reads this to treat it as the stop it is."""
    return _Held.stopping


@contextlib.contextmanager
def stop_signals(after=None) -> Iterator[None]:
    """Inside, SIGTERM, SIGINT and SIGHUP raise Terminated (held by all_or_none); afterwards
    the handlers are as they were, or `after` (signal.SIG_IGN for a process that has only
    its exit left: a late Ctrl-C must not change its exit code). Nests; does nothing
    outside the main thread."""
    originals = {}
    if _Held.installed == 0:
        if threading.current_thread() is not threading.main_thread():
            yield   # signals are the main thread's to take
            return
        originals = {s: signal.signal(s, on_stop_signal) for s in STOP_SIGNALS}
        _Held.stopping = False
    _Held.installed += 1
    try:
        yield
    finally:
        _Held.installed -= 1
        for s, h in originals.items():
            signal.signal(s, h if after is None else after)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
