"""Stop what a command started when the command is interrupted or killed.

``opticam run`` starts processes whose code it does not own: without
``PREFECT_API_URL``, Prefect starts a temporary API server (``python -m uvicorn ...``,
about 200 MB) and stops it from an :mod:`atexit` hook. Measured before this module:
SIGTERM ended Python without running that hook and SIGKILL cannot be handled, so both
left the server running (holding the command's stdout, so ``opticam run | tee`` hung);
SIGINT waited 31 s for the shard in progress to finish, and wrote it, before exiting.
Inside :func:`supervised`:

- **SIGTERM** raises :class:`Terminated` in the main thread (SIGINT already raises
  :class:`KeyboardInterrupt`). When no shard is in progress, the main thread unwinds at
  once: Prefect marks the flow run Crashed and stops its server at exit, as on any exit.
- **A shard in progress is abandoned.** Prefect's task runner, unwinding, joins the
  worker thread that computes the shard, so the main thread would wait for the whole
  shard. An *interrupt watcher* thread learns of the signal through
  :func:`signal.set_wakeup_fd` (written by Python's C-level handler whichever Python
  handler runs; Prefect installs its own for SIGTERM during a flow). When the main thread
  has not left the block :data:`UNWIND` seconds later, the watcher stops the processes
  started inside the block, writes the one-line message and ends the process with
  ``128 + signal`` without waiting for threads (2.4 s after SIGTERM, measured). Outputs
  are written atomically when a shard ends, so the abandoned shard leaves nothing.
- **SIGKILL, or any death, is cleaned up from outside** by a *lifeline* watchdog,
  ``python -m opticam.cli.lifeline``, in its own session so that Ctrl-C and a terminal
  hang-up do not reach it. It holds the read end of a pipe whose write end only the
  supervised process holds (not inherited by exec'd children, closed in forked ones), so
  the kernel ends the pipe however that process dies. Until then it records the
  supervised process's descendants every :data:`POLL_INTERVAL` seconds; at end of file
  it stops (SIGTERM, :data:`GRACE` seconds, SIGKILL) those that still run, their
  children, and, for what was started since the last record, the processes whose
  environment holds this run's token (:data:`TOKEN_VARIABLE`, set inside the block and
  inherited by children, Prefect's server included: the "cookie" Jenkins' process-tree
  killer uses). psutil identifies a process by PID *and* creation time, so a reused PID
  is never signalled; only processes started after the watchdog was ready are ever
  candidates, so the caller's parent and anything it started before are never touched.
  Leaving the block has the watchdog record once more and stop recording (*freeze*); the
  pipe is closed at process exit by an :mod:`atexit` hook registered before Prefect's
  (hooks run last in, first out), so by then Prefect has stopped its server and the
  watchdog finds nothing to stop.

Why not the alternatives (Prefect 3.9.1, Linux):

- ``PR_SET_PDEATHSIG`` must be set in the child between fork and exec, and Prefect's
  ``subprocess.Popen`` of the server takes no ``preexec_fn`` from us. It fires when the
  *thread* that forked the child exits (Prefect forks the server from the main thread for
  a sync flow today, measured, but that is its implementation detail), and it covers
  direct children only.
- A process group of our own (``setpgid``) would let one ``killpg`` stop everything, but
  it takes the command out of the shell's foreground group, so Ctrl-C in
  ``opticam run | tee log`` would no longer reach it; and after SIGKILL nobody is left to
  call ``killpg``.

Costs, measured on a 2-core machine with 75 to 90 processes: the watchdog is ready 0.06
to 0.1 s after it is started (stdlib and psutil only: no torch, no Prefect), uses 15 MB
and 0.5 % of a core while it records (about 1 ms per record: descendants are read from
``/proc/PID/task/TID/children``, see :func:`_descendants`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType

import psutil

__all__ = [
    "GRACE",
    "POLL_INTERVAL",
    "STARTUP",
    "TOKEN_VARIABLE",
    "UNWIND",
    "Terminated",
    "interrupted",
    "stop_processes",
    "supervised",
    "watch",
]

#: Seconds between two records of the supervised process's descendants.
POLL_INTERVAL = 0.2
#: Seconds a stopped process gets between SIGTERM and SIGKILL.
GRACE = 3.0
#: Seconds the main thread gets to leave the block after SIGTERM or SIGINT before the
#: interrupt watcher ends the process (Prefect needs well under one to report a crash).
UNWIND = 2.0
#: The environment variable that marks the processes started inside :func:`supervised`.
TOKEN_VARIABLE = "OPTICAM_LIFELINE"
#: Seconds to wait for the watchdog to be ready (or to acknowledge a freeze).
STARTUP = 30.0

# The one byte of the pipe protocol: stop recording (the block was left normally).
_FREEZE = b"f"
# Signals that stop a supervised block.
_STOPPING = (signal.SIGTERM, signal.SIGINT)


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM inside :func:`supervised`.

    A :class:`BaseException`, like :class:`KeyboardInterrupt`, so that no
    ``except Exception`` on the way up swallows it.

    Attributes:
        signum: the signal that arrived (``signal.SIGTERM``).
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def interrupted(label: str, signum: int) -> str:
    """The line a command writes when a signal stops it: ``"LABEL: interrupted by SIGTERM"``."""
    return f"{label}: interrupted by {signal.Signals(signum).name}"


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def stop_processes(processes: Iterable[psutil.Process], grace: float = GRACE) -> int:
    """SIGTERM the processes that still run, SIGKILL those alive ``grace`` seconds later.

    Args:
        processes: psutil handles; one whose PID now belongs to another process (psutil
            compares creation times) is left alone.
        grace: seconds between SIGTERM and SIGKILL.

    Returns:
        How many processes were sent SIGTERM.
    """
    alive = []
    for process in processes:
        # psutil refuses to signal a reused PID: NoSuchProcess, as for an exited one.
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.terminate()
            alive.append(process)
    _, left = psutil.wait_procs(alive, timeout=grace)
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.kill()
    psutil.wait_procs(left, timeout=1.0)
    return len(alive)


# Linux lists each thread's children in /proc (CONFIG_PROC_CHILDREN, on in the usual
# kernels): reading the few files of our own descendants is cheap, where psutil's
# ``children()`` reads the status of every process of the machine. Measured with 600
# processes: 0.8 ms against 32 to 77 ms per call, i.e. up to 38 % of a core at five
# records a second.
_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _child_pids(pid: int) -> list[int]:
    pids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        # A thread that ended meanwhile has no file any more.
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/task/{tid}/children") as f,
        ):
            pids.extend(int(field) for field in f.read().split())
    return pids


def _descendants(parent: psutil.Process) -> list[psutil.Process]:
    """Children of ``parent``, their children, and so on (none when it no longer runs)."""
    if not _PROC_CHILDREN:
        try:
            return parent.children(recursive=True)
        except psutil.Error:
            return []
    if not parent.is_running():  # its PID may be another process's by now
        return []
    found: list[psutil.Process] = []
    queue = [parent.pid]
    while queue:
        try:
            pids = _child_pids(queue.pop())
        except OSError:  # the process ended meanwhile
            continue
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(pid))
                queue.append(pid)
    return found


def _started_since(
    parent: psutil.Process, before: set[tuple[int, float]], exclude: int
) -> list[psutil.Process]:
    """Descendants of ``parent`` not in ``before`` (``(pid, create time)`` pairs)."""
    started = []
    for process in _descendants(parent):
        with contextlib.suppress(psutil.Error):
            if process.pid != exclude and (process.pid, process.create_time()) not in before:
                started.append(process)
    return started


def _snapshot(parent: psutil.Process) -> set[tuple[int, float]]:
    keys = set()
    for process in _descendants(parent):
        with contextlib.suppress(psutil.Error):
            keys.add((process.pid, process.create_time()))
    return keys


# --------------------------------------------------------------------------- the watchdog


def watch(
    fd: int, pid: int, token: str, interval: float = POLL_INTERVAL, grace: float = GRACE
) -> int:
    """The watchdog's loop (``python -m opticam.cli.lifeline FD PID TOKEN``); returns 0.

    Writes ``ready`` to stdout once it knows the descendants that already exist, then
    records those started later; when ``fd`` reads :data:`_FREEZE` it records once more,
    stops recording and writes ``frozen``. At end of file it stops what still runs of:
    the recorded processes, their children, and the processes started after the watchdog
    whose environment holds ``TOKEN`` (in :data:`TOKEN_VARIABLE`).

    Args:
        fd: the read end of the lifeline pipe.
        pid: the supervised process (the watchdog's parent).
        token: the value of :data:`TOKEN_VARIABLE` the supervised process gives its
            children.
        interval: seconds between two records.
        grace: seconds between SIGTERM and SIGKILL.
    """
    supervised_process = psutil.Process(pid)
    me = os.getpid()
    started_at = psutil.Process(me).create_time()
    before = _snapshot(supervised_process)
    recorded: dict[tuple[int, float], psutil.Process] = {}

    def record() -> None:
        for process in _started_since(supervised_process, before, exclude=me):
            with contextlib.suppress(psutil.Error):
                recorded.setdefault((process.pid, process.create_time()), process)

    def reply(line: str) -> None:
        with contextlib.suppress(OSError):  # the supervised process may be gone
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    reply("ready")
    recording = True
    while True:
        if recording:
            record()
        readable, _, _ = select.select([fd], [], [], interval if recording else None)
        if not readable:
            continue
        data = os.read(fd, 64)
        if not data:
            break
        if _FREEZE in data and recording:
            record()
            recording = False
            reply("frozen")
    stop_processes(_left_running(recorded.values(), token, started_at, me), grace)
    return 0


def _left_running(
    recorded: Iterable[psutil.Process], token: str, since: float, me: int
) -> list[psutil.Process]:
    """What the watchdog stops, the children of each included.

    The recorded processes that still run, and the processes started after ``since``
    that inherited ``token``. The children matter: some were started after the last
    record, and the supervised process's own children are not its children any more
    once it died.
    """
    targets = {p.pid: p for p in recorded if p.is_running()}
    for process in [*targets.values(), *_tagged(token, since, exclude=me)]:
        targets.setdefault(process.pid, process)
        for child in _descendants(process):
            if child.pid != me:
                targets.setdefault(child.pid, child)
    return list(targets.values())


def _tagged(token: str, since: float, exclude: int) -> list[psutil.Process]:
    """The processes started after ``since`` whose environment holds ``token``.

    Environments that cannot be read (other users' processes) are skipped.
    """
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid == exclude or process.create_time() < since:
                continue
            if process.environ().get(TOKEN_VARIABLE) == token:
                found.append(process)
    return found


def _read_line(fd: int, timeout: float) -> bytes:
    """One line from ``fd``, or what came before EOF or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 64)
        if not chunk:
            break
        line += chunk
    return line


class _Lifeline:
    """The supervised side of the watchdog: the pipe's write end, its replies, its handle.

    Raises:
        RuntimeError: the watchdog did not start.
    """

    def __init__(self) -> None:
        self.token = f"{os.getpid()}-{uuid.uuid4().hex}"
        read_fd, self.write_fd = os.pipe()
        package_root = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}
        try:
            self.watchdog = subprocess.Popen(
                [
                    *(sys.executable, "-m", "opticam.cli.lifeline"),
                    *(str(read_fd), str(os.getpid()), self.token),
                ],
                pass_fds=(read_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                env=env,
                # Its own session: Ctrl-C (sent to the foreground process group) and a
                # terminal hang-up must not stop the process that cleans up after them.
                start_new_session=True,
            )
        except BaseException:
            os.close(self.write_fd)
            raise
        finally:
            os.close(read_fd)
        assert self.watchdog.stdout is not None
        self.replies = self.watchdog.stdout
        self._lock = threading.Lock()
        self.closed = False
        # Nothing may be started before the watchdog knows what existed already.
        if _read_line(self.replies.fileno(), STARTUP) != b"ready\n":
            self.release()
            raise RuntimeError(
                f"the lifeline watchdog did not start (exit status {self.watchdog.poll()})"
            )
        # Registered before Prefect registers the stop of its server, so it runs after it.
        atexit.register(self.release)
        _OPEN.add(self)

    def freeze(self) -> None:
        """Have the watchdog record what runs now and stop recording; returns once it did.

        What was recorded is stopped when this process exits, if it still runs then.
        """
        with self._lock, contextlib.suppress(OSError):
            if not self.closed:
                os.write(self.write_fd, _FREEZE)
                _read_line(self.replies.fileno(), STARTUP)

    def release(self, timeout: float = 1.0) -> None:
        """Close the pipe: the watchdog stops what it recorded and still runs, then exits."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            os.close(self.write_fd)
            self.replies.close()
        atexit.unregister(self.release)
        _OPEN.discard(self)
        # Reap it when it is quick; a watchdog still stopping processes finishes alone.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.watchdog.wait(timeout)


# The lifelines whose pipe is open in this process.
_OPEN: set[_Lifeline] = set()


def _close_in_child() -> None:
    # A forked child (a multiprocessing worker) holding a write end would keep the
    # watchdog from seeing end of file until it exits too.
    for lifeline in _OPEN:
        lifeline.closed = True
        with contextlib.suppress(OSError):
            os.close(lifeline.write_fd)
    _OPEN.clear()


os.register_at_fork(after_in_child=_close_in_child)


# --------------------------------------------------------------------------- the interrupt watcher


class _InterruptWatcher:
    """Ends the process when the main thread does not leave the block after a signal.

    Python's C-level signal handler writes each signal's number to the wakeup file
    descriptor as the signal arrives, whichever Python handler will run and even while
    the main thread is blocked joining a thread.
    """

    def __init__(self, label: str, unwind: float, abandon: Callable[[], object]) -> None:
        self.label = label
        self.unwind = unwind
        self.left = threading.Event()
        self._claim = threading.Lock()
        self._abandon = abandon
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(
            target=self._run, name="opticam-interrupt-watcher", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self.left.is_set():
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            signums = [s for s in data if s in _STOPPING]
            if not signums or self.left.is_set():
                continue
            if self.left.wait(self.unwind) or not self.claim():
                return
            # The main thread is stuck (joining the thread of a shard in progress).
            with contextlib.suppress(Exception):
                self._abandon()
            with contextlib.suppress(Exception):
                sys.stderr.write(interrupted(self.label, signums[0]) + "\n")
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(128 + signums[0])

    def claim(self) -> bool:
        """True for the first caller: the one that ends the block (main thread or watcher)."""
        return self._claim.acquire(blocking=False)

    def close(self) -> None:
        """Called by the main thread leaving the block; blocks if the watcher is exiting."""
        self.left.set()
        if not self.claim():
            # The watcher is ending the process; it must not see us go on meanwhile.
            threading.Event().wait()
        signal.set_wakeup_fd(self._previous_fd)
        os.write(self._write_fd, b"\0")  # wakes the watcher, which sees ``left``
        self._thread.join()
        os.close(self._read_fd)
        os.close(self._write_fd)


# --------------------------------------------------------------------------- the context


@contextlib.contextmanager
def supervised(
    label: str,
    *,
    on_abandon: Callable[[], object] | None = None,
    grace: float = GRACE,
    unwind: float = UNWIND,
) -> Iterator[None]:
    """Stop the processes started inside the block when it is interrupted or killed.

    Inside the block (entered in the main thread) SIGTERM raises :class:`Terminated`; the
    previous handler is restored on exit. After SIGTERM or SIGINT, a main thread that has
    not left the block within ``unwind`` seconds (it waits for a worker thread) is not
    waited for: ``on_abandon`` is called, the descendants started inside are stopped,
    ``interrupted(label, signal)`` is written to stderr and the process exits with status
    ``128 + signal``, skipping :mod:`atexit` hooks. Leaving the block, normally or by an
    exception, stops nothing at once; what was started inside and still runs when the
    process ends is stopped then: by its owner (Prefect's :mod:`atexit` hook stops its
    server), else by the lifeline watchdog, which also acts when the process dies in any
    other way, SIGKILL included (see the module docstring).

    Args:
        label: who is interrupted, for the message (``"opticam run"``).
        on_abandon: what must happen even when the main thread is not waited for (stop a
            live progress bar, which hides the terminal's cursor); it gets one second, in
            another thread.
        grace: seconds between SIGTERM and SIGKILL when stopping processes.
        unwind: seconds the main thread gets to leave the block after a signal.

    Raises:
        RuntimeError: the watchdog could not be started, or not in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("supervised() needs the main thread (signals are handled there)")
    me = psutil.Process()
    before = _snapshot(me)
    with contextlib.ExitStack() as stack:  # undone in reverse order, also on error
        lifeline = _Lifeline()

        def started() -> list[psutil.Process]:
            return _started_since(me, before, exclude=lifeline.watchdog.pid)

        def leave() -> None:
            # What still runs (Prefect's server) is stopped at exit by its owner, else by
            # the watchdog, which must have recorded it.
            if started():
                lifeline.freeze()
            else:
                lifeline.release()

        def abandon() -> None:
            if on_abandon is not None:
                # The main thread may hold what on_abandon needs: never wait for it long.
                helper = threading.Thread(target=on_abandon, name="opticam-abandon", daemon=True)
                helper.start()
                helper.join(1.0)
            stop_processes(started(), grace)

        stack.callback(leave)
        stack.callback(_InterruptWatcher(label, unwind, abandon).close)
        previous = signal.getsignal(signal.SIGTERM)  # None: a handler installed from C
        stack.callback(
            signal.signal, signal.SIGTERM, signal.SIG_DFL if previous is None else previous
        )
        signal.signal(signal.SIGTERM, _raise_terminated)
        stack.callback(_restore_variable, TOKEN_VARIABLE, os.environ.get(TOKEN_VARIABLE))
        os.environ[TOKEN_VARIABLE] = lifeline.token
        yield


def _restore_variable(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: python -m opticam.cli.lifeline FD PID TOKEN\n")
        return 2
    return watch(int(argv[0]), int(argv[1]), argv[2])


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
