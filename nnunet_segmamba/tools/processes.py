"""Child commands that end with us: however our command is stopped (Ctrl-C, SIGTERM from `kill`, `timeout` or a
scheduler, SIGHUP of a closed terminal), the nnU-Net processes it started and their workers end too.

Stop signals raise KeyboardInterrupt, as Ctrl-C does, so that the code that started a child ends it on the way
out with `end_tree`: the child and every process below it (nnU-Net's augmentation and export workers) get SIGTERM
at once, SIGKILL what is left after a grace period. Children stay in our process group, so signals to the whole
group (a terminal's Ctrl-C, `timeout`, `kill -- -PGID`) reach them directly as well.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_SECONDS = 10.0
PROC = Path("/proc")


class Process(NamedTuple):
    """A process, told apart from a later one that reuses its pid by its start time."""

    pid: int
    started: int


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None when the process is gone."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def process(pid: int) -> Process | None:
    fields = _stat(pid)
    return Process(pid, int(fields[19])) if fields else None


def alive(entry: Process) -> bool:
    """The process still runs: it exists, is not a zombie, and is the same process (start time)."""
    if not PROC.is_dir():
        try:
            os.kill(entry.pid, 0)
        except ProcessLookupError:
            return False
        return True
    fields = _stat(entry.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == entry.started


def tree(pid: int) -> list[Process]:
    """The process and all processes below it (from /proc; only the process itself where there is no /proc)."""
    if not PROC.is_dir():
        return [Process(pid, 0)]
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if (entry := process(current)) is not None:
            found.append(entry)
            todo.extend(children.get(current, []))
    return found


def _signal_all(processes: list[Process], signum: int) -> None:
    for entry in processes:
        if alive(entry):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(entry.pid, signum)


def with_environment(name: str, value: str) -> list[Process]:
    """Our processes started with `name`=`value` in their environment: one given it and all below it, also once
    orphaned (none where there is no /proc)."""
    wanted, found = f"{name}={value}".encode(), []
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environment = (entry / "environ").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if wanted in environment and (found_process := process(int(entry.name))):
                found.append(found_process)
    return found


def end(processes: list[Process], grace: float = GRACE_SECONDS, reap: Callable[[], object] = lambda: None) -> None:
    """SIGTERM to all the processes at once, SIGKILL to any left after `grace` seconds. Returns once none of them
    runs (or `grace` after SIGKILL), calling `reap` meanwhile; further stop signals wait until then."""
    with signals_ignored(*STOP_SIGNALS):  # we are stopping already
        for signum in (signal.SIGTERM, signal.SIGKILL):
            _signal_all(processes, signum)
            deadline = time.monotonic() + grace
            while any(map(alive, processes)) and time.monotonic() < deadline:
                reap()
                time.sleep(0.05)


def end_tree(child: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """End `child` and every process below it (see `end`). A child already ended is left alone: once reaped, its
    pid may belong to another process."""
    if child.poll() is not None:
        return
    end(tree(child.pid), grace, child.poll)  # polling reaps the child; its own children are reaped by it or by init
    child.poll()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


_HANDLERS_OUTSIDE: dict[int, object] = {}
"""The stop signals' handlers outside the outermost stop_signals_interrupt block, while one is active."""


def _outside_handlers_in_forked_child() -> None:
    """A child forked within the block (a worker of nnU-Net's multiprocessing pools) handles stop signals as outside
    it: the SIGTERM of Pool.terminate ends it at once, instead of raising where it may hold the pool's queue lock
    and leave its siblings, and the pool's join, waiting forever."""
    for signum, handler in _HANDLERS_OUTSIDE.items():
        signal.signal(signum, handler)
    _HANDLERS_OUTSIDE.clear()


os.register_at_fork(after_in_child=_outside_handlers_in_forked_child)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM, SIGHUP and SIGINT raise KeyboardInterrupt (SIGINT also where it was ignored, as in
    a script's background job: children inherit the default, not the ignore). SIGHUP stays ignored under nohup.
    The previous handlers come back afterwards, and in children forked within the block; outside the main thread
    this does nothing."""
    if not _in_main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    outermost = not _HANDLERS_OUTSIDE
    if outermost:
        _HANDLERS_OUTSIDE.update(previous)
    for signum in STOP_SIGNALS:
        if not (signum == signal.SIGHUP and previous[signum] == signal.SIG_IGN):
            signal.signal(signum, _raise_interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if outermost:
            _HANDLERS_OUTSIDE.clear()


@contextlib.contextmanager
def signals_ignored(*signums: int) -> Iterator[None]:
    """The signals are ignored within the block, also by the commands started in it (an ignored signal stays
    ignored across exec, a handled one does not), then handled as before; outside the main thread this does
    nothing."""
    if not _in_main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
