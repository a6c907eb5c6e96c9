"""Child processes that end with ours: a child's whole tree ends, stop signals raise KeyboardInterrupt."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nnunet_segmamba.tools.processes import end_tree, stop_signals_interrupt
from tests.processes import running, wait_for

STUBBORN_TREE = textwrap.dedent("""
    import multiprocessing, signal, sys, time

    def worker(ignore_term):
        if ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(300)

    if __name__ == "__main__":
        workers = [multiprocessing.Process(target=worker, args=(i == 1,)) for i in range(2)]
        for w in workers:
            w.start()
        print(" ".join(str(w.pid) for w in workers), flush=True)
        time.sleep(300)
""")


def test_end_tree_ends_the_child_and_its_workers_even_one_that_ignores_sigterm():
    child = subprocess.Popen([sys.executable, "-c", STUBBORN_TREE], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in child.stdout.readline().split()]
        started = time.time()
        end_tree(child, grace=1.0)
        assert child.returncode is not None and time.time() - started < 10
        assert not {child.pid, *workers} & set(running())
    finally:
        child.kill()


def test_end_tree_leaves_an_ended_child_alone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    end_tree(child)  # its pid may belong to another process by now: nothing is signalled
    assert child.returncode == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signals_raise_keyboard_interrupt_then_the_old_handlers_return(signum):
    outside = signal.signal(signum, signal.SIG_DFL)  # as in a terminal (under nohup SIGHUP is ignored: next test)
    try:
        with pytest.raises(KeyboardInterrupt, match=signum.name), stop_signals_interrupt():
            signal.raise_signal(signum)
            wait_for(lambda: False, 5, "the signal")
        assert signal.getsignal(signum) == signal.SIG_DFL
    finally:
        signal.signal(signum, outside)


def test_an_ignored_sighup_stays_ignored_as_under_nohup():
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_signals_interrupt():
            signal.raise_signal(signal.SIGHUP)  # ignored: no KeyboardInterrupt
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_children_forked_within_the_block_handle_stop_signals_as_outside_it():
    """nnU-Net's planner and preprocessing fork multiprocessing pools inside our tools; Pool.terminate ends their
    workers with SIGTERM. Workers that raised KeyboardInterrupt instead could die holding the pool's queue lock and
    leave the pool's join waiting forever (seen in CI: `nnunet-segmamba plan` hung in Pool.__exit__). One pool: the
    workers' handlers say it every time; forking a second pool while the first one's threads still ran hung twice in
    ~60 runs on a loaded machine (not understood; a fork beside running threads can deadlock)."""
    script = textwrap.dedent("""
        import multiprocessing, signal
        from nnunet_segmamba.tools.processes import stop_signals_interrupt

        def handler(_):
            return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        with stop_signals_interrupt():
            with multiprocessing.get_context("fork").Pool(4) as pool:  # __exit__: terminate, SIGTERM
                assert all(pool.map(handler, range(8)))
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # this process still raises
        print("pools ended")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "pools ended\n", done.stderr
    assert "KeyboardInterrupt" not in done.stderr
