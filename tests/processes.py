"""Which processes run, found by their command line and environment (/proc), independently of the code under test."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def running() -> dict[int, str]:
    """{pid: command line} of every process that is not a zombie, except this one."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            stat = _read(entry / "stat")
            if stat and stat.rsplit(")", 1)[1].split()[0] != "Z":
                found[int(entry.name)] = _read(entry / "cmdline")
    return found


def mentioning(text: str) -> dict[int, str]:
    """The running processes whose command line or environment contains `text` (a workspace, a sweep's folder)."""
    return {pid: command for pid, command in running().items()
            if text in command or text in _read(Path("/proc") / str(pid) / "environ")}


def wait_for(condition: Callable[[], object], seconds: float, what: str) -> object:
    """The first true value of `condition()`, polled for up to `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds:.0f} s: {what}")


def _hangup_as_from_a_terminal() -> None:
    """For a child process: SIGHUP ends it, as in a terminal session (not ignored, as under nohup)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@contextlib.contextmanager
def one_per_stop_signal(root: Path, command: Callable[[Path], list[str]],
                        env: dict[str, str]) -> Iterator[dict[signal.Signals, tuple[Path, subprocess.Popen]]]:
    """`command(folder)` started once per stop signal, side by side, each with its own folder root/<SIGNAL>;
    afterwards whatever still mentions those folders is killed."""
    started = {signum: (root / signum.name, subprocess.Popen(
        command(root / signum.name), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_hangup_as_from_a_terminal)) for signum in STOP_SIGNALS}
    try:
        yield started
    finally:
        for folder, process in started.values():
            process.kill()
            for pid in mentioning(str(folder)):
                os.kill(pid, signal.SIGKILL)


def stop_with(signum: signal.Signals, process: subprocess.Popen, folder: Path) -> str:
    """Send `signum` to the process alone; its output, once it has exited with 130 (interrupted) leaving no
    process that mentions `folder`."""
    process.send_signal(signum)
    text = process.communicate(timeout=120)[0]
    assert process.returncode == 130, text[-3000:]
    assert not mentioning(str(folder)), f"{signum.name} left {mentioning(str(folder))}"
    return text
