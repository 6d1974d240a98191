"""Run untrusted Python programs in a sandbox, and the unbiased pass@k estimator.

How a program runs
------------------
``run_program`` starts this very file as a *launcher* script (``python -I``, new session, minimal
environment, stdin on /dev/null, stdout and stderr on pipes). The launcher is trusted code: it sets
up the isolation, forks the program's process, enforces the deadline, and reports to the harness on
a private pipe that the program never holds. The program's process:

* is pid 1 of a new PID namespace: when it ends or is killed, the kernel kills every process it left
  behind, also those that left its process group (``setsid``); it cannot signal processes outside
  the namespace (``/proc`` still lists them);
* is in a new network namespace whose only interface (loopback) is down: it reaches nothing,
  127.0.0.1 included. On top, ``socket`` is patched in Python so that attempts fail with a clear
  message;
* runs, when the harness is root, as a dedicated unprivileged uid (``SandboxLimits.sandbox_uid``
  plus a slot, one uid per concurrent program) in a scratch directory it owns: it cannot signal,
  trace or read the memory of the harness, nor touch the harness's files (the parent directory is
  root's, mode 0711), and RLIMIT_NPROC counts its processes alone;
* has resource limits: address space, CPU seconds, file size, processes, no core files;
* dies with the launcher (parent-death signal), which dies with the harness's thread.

A program counts as passed only if its code ran to the end: after the code returns, its process
writes a random token, which the program never receives through argv, environment or files, to the
launcher and exits 0. ``sys.exit``, ``os._exit``, signals, crashes, timeouts and too much output
(``max_output_mb``, read from pipes) are failures. Whatever goes wrong inside the sandbox is a failure
of that program, never of the run.

What is not covered
-------------------
* Namespaces need root (or unprivileged user namespaces, tried when the harness is not root). Where
  the kernel refuses them, the launcher goes on without, and ``probe_sandbox`` and a one-time
  warning say what is missing. Without a network namespace only the Python patch blocks the network
  (a subprocess or ctypes gets through). Without a PID namespace, processes that leave the process
  group are killed only when the program ran under its own uid (the launcher kills all of that uid's
  processes). Without a separate uid (harness not root) the program runs as the harness's user: it
  can write that user's files, and RLIMIT_NPROC counts all of that user's processes.
* The file system is not virtualised: the program can read world-readable files and write in
  world-writable directories (/tmp, /dev/shm), where disk use is bounded per file only.
* A deliberately malicious program shares its interpreter with the token and can dig it out of
  memory: the token stops programs that end early, not an attacker. Run code from a source you do
  not trust inside a container or VM as well.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

__all__ = ["SandboxLimits", "ExecutionResult", "run_program", "run_programs", "probe_sandbox", "pass_at_k",
           "aggregate_pass_at_k"]

_LAUNCHER = os.path.abspath(__file__)
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_KEEPCAPS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 1, 8, 47, 2
_CAP_DAC_READ_SEARCH, _LINUX_CAPABILITY_VERSION_3 = 2, 0x20080522
_BACKSTOP_S = 2.0  # the harness stops a launcher that overran its own deadline by this much
_NETWORK_ERROR = "network access is disabled in the asarm execution sandbox"


# ---------------------------------------------------------------------------------------------------
# Harness side
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits and isolation; None leaves a limit unset. CPU seconds follow from the timeout.

    ``max_processes`` (RLIMIT_NPROC) counts the processes and threads of the program's uid: its own
    when the harness is root (``sandbox_uid``), all of the harness user's otherwise. ``max_output_mb``
    bounds stdout plus stderr; ``max_output_chars`` is the length of the reported stderr tail.
    ``sandbox_uid`` is the first uid programs run as when the harness is root (None: the harness's
    user); ``namespaces`` asks for new network and PID namespaces where the kernel allows them.
    """

    memory_mb: int | None = 1024
    file_size_mb: int | None = 16
    max_processes: int | None = 256
    max_output_chars: int = 2000
    max_output_mb: int = 16
    sandbox_uid: int | None = 61000
    namespaces: bool = True

    def __post_init__(self):
        for name in ("memory_mb", "file_size_mb", "max_processes", "sandbox_uid"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < (0 if name == "sandbox_uid" else 1)):
                raise ValueError(f"SandboxLimits.{name} must be a positive integer or None, got {value!r}")
        for name in ("max_output_chars", "max_output_mb"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"SandboxLimits.{name} must be a positive integer, got {value!r}")
        if type(self.namespaces) is not bool:
            raise ValueError(f"SandboxLimits.namespaces must be True or False, got {self.namespaces!r}")


@dataclass(frozen=True)
class ExecutionResult:
    """``status`` is "passed" (ran to the end, exit code 0), "failed" or "timeout"; ``error`` is
    the tail of stderr (or the reason) for a program that did not pass."""

    passed: bool
    status: str
    error: str
    duration: float


@dataclass
class _Run:
    """What the harness saw of one launcher run."""

    report: dict | None  # the launcher's final report; None if it never came
    stderr: str          # tail of the program's stderr
    stopped: str | None  # "timeout" or "output" when the harness had to stop the launcher


class _UidPool:
    """Hands out one uid per concurrently running program, so that RLIMIT_NPROC and "kill all of this
    uid's processes" concern that program alone (within this process; see the module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._busy: set[int] = set()

    @contextmanager
    def lease(self, first: int) -> Iterator[int]:
        with self._lock:
            slot = next(i for i in range(len(self._busy) + 1) if i not in self._busy)
            self._busy.add(slot)
        try:
            yield first + slot
        finally:
            with self._lock:
                self._busy.discard(slot)


_UIDS = _UidPool()
_WARNED: set[str] = set()


def _rlimits(timeout: float, limits: SandboxLimits) -> list[tuple[str, int, int]]:
    mb = 1 << 20
    cpu = math.ceil(timeout) + 1
    out = [("RLIMIT_CORE", 0, 0), ("RLIMIT_CPU", cpu, cpu + 1)]
    if limits.memory_mb is not None:
        out.append(("RLIMIT_AS", limits.memory_mb * mb, limits.memory_mb * mb))
    if limits.file_size_mb is not None:
        out.append(("RLIMIT_FSIZE", limits.file_size_mb * mb, limits.file_size_mb * mb))
    if limits.max_processes is not None:
        out.append(("RLIMIT_NPROC", limits.max_processes, limits.max_processes))
    return out


def _check_arguments(program: str, timeout: float, limits: SandboxLimits) -> None:
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
    if os.name != "posix":
        raise RuntimeError("the asarm execution sandbox needs a POSIX system (Linux or macOS)")


@contextmanager
def _scratch(program: str, uid: int | None) -> Iterator[tuple[str, str, str]]:
    """A private directory holding the source (read and removed by the launcher) and the program's
    working directory, owned by ``uid`` if given. Yields (root, source path, work dir)."""
    root = tempfile.mkdtemp(prefix="asarm-exec-")
    try:
        os.chmod(root, 0o711)  # the program may pass through to its work dir, not list or change it
        source = os.path.join(root, "program.py")
        # lone surrogates must not crash the harness: they reach the program, which then fails to compile
        with open(os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(program.encode("utf-8", errors="surrogatepass"))
        workdir = os.path.join(root, "work")
        os.mkdir(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
        yield root, source, workdir
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the program may have emptied or removed parts of it


def _start_launcher(config: dict, workdir: str, control_w: int) -> subprocess.Popen:
    env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    # No preexec_fn: it is unsafe in a process with threads, and run_programs uses a thread pool.
    # The launcher does the set-up itself, before any untrusted code runs.
    return subprocess.Popen([sys.executable, "-I", "-X", "utf8", _LAUNCHER, json.dumps(config)], cwd=workdir,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(control_w,), start_new_session=True)


class _Pipes:
    """Drains the launcher's stdout, stderr and control pipes without blocking: stdout is only
    counted, stderr's tail and the control messages are kept."""

    def __init__(self, proc: subprocess.Popen, control_r: int, tail_bytes: int):
        self.stdout, self.stderr, self.control = proc.stdout.fileno(), proc.stderr.fileno(), control_r
        self.selector = selectors.DefaultSelector()
        for fd in (self.stdout, self.stderr, self.control):
            self.selector.register(fd, selectors.EVENT_READ)
        self.open = {self.stdout, self.stderr, self.control}
        self.output_bytes = 0
        self.tail = bytearray()
        self.tail_bytes = tail_bytes
        self.messages = bytearray()

    def pump(self, until: float, output_cap: int | None = None) -> None:
        """Read until the control pipe closes, ``until`` (monotonic) passes or output exceeds the cap."""
        while self.control in self.open and (output_cap is None or self.output_bytes <= output_cap):
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            for key, _ in self.selector.select(remaining):
                self._read(key.fd)

    def drain(self, until: float) -> None:
        """Read what is left on stdout and stderr, until both close or ``until`` passes."""
        while self.open - {self.control} and time.monotonic() < until:
            for key, _ in self.selector.select(max(0.0, until - time.monotonic())):
                self._read(key.fd)

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(fd)
            self.open.discard(fd)
        elif fd == self.control:
            self.messages += data
        else:
            self.output_bytes += len(data)
            if fd == self.stderr:
                self.tail = (self.tail + data)[-self.tail_bytes:]

    def close(self) -> None:
        self.selector.close()


def _stop(proc: subprocess.Popen, pipes: _Pipes) -> None:
    """Ask the launcher to kill the program (it alone knows the program's pid for sure), then kill
    the launcher's whole process group; reap the launcher only after that, so that its pid (the
    group id) cannot have been reused by then."""
    if pipes.control in pipes.open:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        pipes.pump(time.monotonic() + 1.0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _execute(program: str, timeout: float, limits: SandboxLimits, uid: int | None) -> _Run:
    with _scratch(program, uid) as (_, source, workdir):
        deadline = time.monotonic() + timeout
        control_r, control_w = os.pipe()
        config = {"source": source, "workdir": workdir, "deadline": deadline, "uid": uid,
                  "namespaces": limits.namespaces, "rlimits": _rlimits(timeout, limits),
                  "harness_pid": os.getpid(), "control_fd": control_w}
        try:
            proc = _start_launcher(config, workdir, control_w)
        except OSError:
            os.close(control_r)
            raise
        finally:
            os.close(control_w)
        pipes = _Pipes(proc, control_r, 4 * limits.max_output_chars)  # a UTF-8 character has <= 4 bytes
        try:
            cap = limits.max_output_mb << 20
            pipes.pump(deadline + _BACKSTOP_S, output_cap=cap)
            stopped = None
            if pipes.output_bytes > cap:
                stopped = "output"
            elif pipes.control in pipes.open:
                stopped = "timeout"
            _stop(proc, pipes)
            pipes.drain(time.monotonic() + 0.2)
        finally:
            pipes.close()
            for stream in (proc.stdout, proc.stderr):
                stream.close()
            os.close(control_r)
    stderr = pipes.tail.decode("utf-8", errors="replace")
    return _Run(_parse_report(pipes.messages), stderr[-limits.max_output_chars:], stopped)


def _parse_report(messages: bytes) -> dict | None:
    try:
        report = json.loads(messages.decode("utf-8"))
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _warn_about_isolation(report: dict) -> None:
    """Say once per process and kind which isolation the kernel or our privileges did not allow."""
    for note in report.get("notes", []):
        if note not in _WARNED:
            _WARNED.add(note)
            warnings.warn(f"asarm execution sandbox: {note}", RuntimeWarning, stacklevel=4)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "the program ended without a status"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = {"SIGXCPU": ": CPU time limit", "SIGKILL": " (memory or process limit, or killed)",
                "SIGSEGV": ": crashed (deep recursion?)"}.get(name, "")
        return f"killed by signal {-code} ({name}){hint}"
    if code == 0:
        return "the program exited with code 0 before the end of its code"
    return f"exit code {code} before the end of the program"


def _verdict(run: _Run, timeout: float, limits: SandboxLimits, duration: float) -> ExecutionResult:
    report = run.report or {}
    if run.stopped == "timeout" or report.get("timeout"):
        return ExecutionResult(False, "timeout", f"timed out after {timeout:g} s", duration)
    if run.stopped == "output":
        return ExecutionResult(False, "failed", f"output over the {limits.max_output_mb} MB limit", duration)
    if run.report is None:
        reason = "the sandbox launcher ended without a report"
        return ExecutionResult(False, "failed", (run.stderr.strip() and run.stderr) or reason, duration)
    if report.get("finished") and report.get("exit_code") == 0:
        return ExecutionResult(True, "passed", "", duration)
    error = run.stderr if run.stderr.strip() else _describe_exit(report.get("exit_code"))
    return ExecutionResult(False, "failed", error, duration)


def run_program(program: str, timeout: float = 3.0, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run one program (its text) in the sandbox; see the module docstring.

    ``timeout`` is wall-clock seconds including the interpreter's start-up (tens of ms when idle).
    """
    _check_arguments(program, timeout, limits)
    start = time.monotonic()
    try:
        if limits.sandbox_uid is not None and os.geteuid() == 0:
            with _UIDS.lease(limits.sandbox_uid) as uid:
                run = _execute(program, timeout, limits, uid)
        else:
            run = _execute(program, timeout, limits, None)
    except OSError as err:  # e.g. no space left for the scratch dir, or no processes left to start
        return ExecutionResult(False, "failed", f"sandbox error: {err}", time.monotonic() - start)
    if run.report:
        _warn_about_isolation(run.report)
    return _verdict(run, timeout, limits, time.monotonic() - start)


def probe_sandbox(limits: SandboxLimits = SandboxLimits()) -> dict:
    """Which isolation a program gets here: {"network_namespace": bool, "pid_namespace": bool,
    "uid": the uid programs run as (None: the harness's), "notes": [what is missing and why]}."""
    _check_arguments("pass", 10.0, limits)
    if limits.sandbox_uid is not None and os.geteuid() == 0:
        with _UIDS.lease(limits.sandbox_uid) as uid:
            run = _execute("pass", 10.0, limits, uid)
    else:
        run = _execute("pass", 10.0, limits, None)
    if run.report is None:
        raise RuntimeError(f"the sandbox launcher failed: {run.stderr.strip().splitlines()[-1:] or 'no output'}")
    return {key: run.report.get(key) for key in ("network_namespace", "pid_namespace", "uid", "notes")}


def run_programs(programs: Sequence[str], timeout: float = 3.0, workers: int | None = None,
                 limits: SandboxLimits = SandboxLimits()) -> list[ExecutionResult]:
    """``run_program`` on each program, ``workers`` at a time (default: the CPU count); results in order."""
    from concurrent.futures import ThreadPoolExecutor

    if workers is not None and (type(workers) is not int or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    programs = list(programs)
    for program in programs:
        _check_arguments(program, timeout, limits)  # bad input fails before any program runs
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda program: run_program(program, timeout, limits), programs))


# ---------------------------------------------------------------------------------------------------
# Launcher side: runs as ``python -I code_execution.py CONFIG`` in its own session. Only the standard
# library is imported here, so the file runs without the asarm package (and without torch).
# ---------------------------------------------------------------------------------------------------

def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _unshare(libc, flags: int) -> str | None:
    """unshare(2); None on success, else why not."""
    if libc is None or not hasattr(libc, "unshare"):
        return "unshare(2) is not available"
    if libc.unshare(flags) != 0:
        import ctypes

        return os.strerror(ctypes.get_errno())
    return None


def _enter_user_namespace(libc) -> str | None:
    """As a non-root user, a user namespace (where the kernel allows it) grants the rights to create
    the other namespaces. Our uid and gid map to themselves, so files keep their owners."""
    uid, gid = os.geteuid(), os.getegid()
    error = _unshare(libc, _CLONE_NEWUSER)
    if error:
        return error
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as err:
            return f"{path}: {err.strerror}"
    return None


def _isolate(namespaces: bool) -> tuple[dict, list[str]]:
    """New network and PID namespaces for the launcher's next child, as far as allowed."""
    done = {"network_namespace": False, "pid_namespace": False}
    notes: list[str] = []
    if not namespaces:
        return done, ["namespaces switched off (SandboxLimits.namespaces)"]
    try:
        libc = _libc() if sys.platform.startswith("linux") else None
    except OSError:
        libc = None
    if libc is not None and os.geteuid() != 0:
        error = _enter_user_namespace(libc)
        if error:
            notes.append(f"no user namespace ({error}), so no network or PID namespace either")
            return done, notes
    for key, flag, loss in (("network_namespace", _CLONE_NEWNET, "only Python's socket module is blocked"),
                            ("pid_namespace", _CLONE_NEWPID, "processes that leave the process group may "
                                                              "outlive the program")):
        error = _unshare(libc, flag)
        done[key] = error is None
        if error:
            notes.append(f"no {key.replace('_', ' ')} ({error}): {loss}")
    return done, notes


def _set_parent_death_signal() -> None:
    if sys.platform.startswith("linux"):
        try:
            _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _set_rlimits(rlimits: list, notes: list[str]) -> None:
    try:
        import resource
    except ImportError:
        notes.append("no resource limits on this platform")
        return
    for name, soft, hard in rlimits:
        if hasattr(resource, name):
            try:
                resource.setrlimit(getattr(resource, name), (soft, hard))
            except (ValueError, OSError) as err:
                notes.append(f"{name} not set ({err})")


def _reachable_by_others(path: str) -> bool:
    """Whether a user other than the owner can get to ``path`` (every directory above it searchable)."""
    import stat

    path = os.path.realpath(path)
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return True  # a missing sys.path entry hides nothing
    return True


def _keep_read_search() -> str | None:
    """Keep CAP_DAC_READ_SEARCH across setuid (also for programs the program starts): read-only access
    to every file. Needed when the interpreter lives where the sandbox uid cannot go (e.g. /root)."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = _libc()
    bit = 1 << _CAP_DAC_READ_SEARCH
    data = (Data * 2)(Data(bit, bit, bit), Data(0, 0, 0))
    if libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0 or \
            libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH, 0, 0) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def _drop_privileges(uid: int | None, notes: list[str]) -> int | None:
    if uid is None:
        if os.geteuid() == 0:
            notes.append("programs run as root (SandboxLimits.sandbox_uid is None): RLIMIT_NPROC is not "
                         "enforced, and the program can signal the harness and change its files")
        return None
    hidden = [p for p in (sys.executable, *sys.path) if p and not _reachable_by_others(p)]
    try:
        if hidden and sys.platform.startswith("linux"):
            _libc().prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError as err:
        notes.append(f"could not switch to uid {uid} ({err.strerror}): the program runs as root")
        return None
    if hidden:
        error = _keep_read_search() if sys.platform.startswith("linux") else "not Linux"
        notes.append(f"the interpreter is not reachable by other users ({hidden[0]}): the program keeps read "
                     f"access to all files (CAP_DAC_READ_SEARCH); install Python world-readable to avoid this"
                     + (f"; that failed too ({error}), imports may fail" if error else ""))
    return uid


def _block_network_in_python() -> None:
    """A clear error for the common ways to open a socket; the network namespace is the real barrier."""
    import _socket
    import socket

    def no_network(*args, **kwargs):
        raise OSError(_NETWORK_ERROR)

    class NoSocket(_socket.socket):
        __init__ = no_network

    socket.socket.__init__ = no_network
    _socket.socket = _socket.SocketType = NoSocket
    for module in (socket, _socket):
        for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "create_connection"):
            if hasattr(module, name):
                setattr(module, name, no_network)


def _run_child(config: dict, source: str, token: str, done_w: int) -> None:
    """The program's process: limits, unprivileged user, then the program's code; never returns."""
    import linecache
    import traceback
    import types

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    notes: list[str] = []
    os.chdir(config["workdir"])
    _set_rlimits(config["rlimits"], notes)
    uid = _drop_privileges(config["uid"], notes)
    _set_parent_death_signal()  # after setuid, which clears it
    os.write(done_w, ("setup " + json.dumps({"uid": uid, "notes": notes}) + "\n").encode())
    _block_network_in_python()
    # The program gets a fresh __main__: the launcher's globals stay out of its sight.
    main = types.ModuleType("__main__")
    sys.modules["__main__"], sys.argv = main, ["program.py"]
    linecache.cache["program.py"] = (len(source), None, source.splitlines(True), "program.py")
    me = os.getpid()
    try:
        exec(compile(source, "program.py", "exec"), main.__dict__)
    except SystemExit as exit_:
        _report_failure(f"the program called exit({exit_.code!r}) before finishing\n")
    except BaseException as error:  # noqa: BLE001 - every way out but the end is a failure
        try:
            traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        finally:
            _report_failure("")
    if os.getpid() != me:  # a forked copy of the program reached the end; only the original counts
        os._exit(1)
    _flush_stdio()
    os.write(done_w, token.encode() + b"\n")
    os._exit(0)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the program may have closed or replaced them
            pass


def _report_failure(message: str) -> None:
    try:
        sys.stderr.write(message)
    except Exception:  # noqa: BLE001
        pass
    _flush_stdio()
    os._exit(1)


def _wait_for_exit(pid: int, deadline: float) -> tuple[int, bool]:
    """Wait for the child until the deadline, then kill it. Returns (wait status, timed out)."""
    try:
        pidfd = os.pidfd_open(pid)  # Linux 5.3+: a wake-up exactly when the child ends
    except (AttributeError, OSError):
        pidfd = None
    import select

    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)  # still our unreaped child: the pid cannot be anyone else's
            return os.waitpid(pid, 0)[1], True
        if pidfd is not None:
            select.select([pidfd], [], [], remaining)
        else:
            time.sleep(min(remaining, 0.01))


def _kill_uid(uid: int) -> None:
    """Without a PID namespace: kill every process of the program's uid (from a helper running as that
    uid, which kill(-1) spares), so that children that left the process group die too."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(3):  # a fork bomb may fork between two rounds
                try:
                    os.kill(-1, signal.SIGKILL)
                except OSError:
                    pass
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _read_available(fd: int) -> list[str]:
    os.set_blocking(fd, False)  # without a PID namespace, leftover processes may hold the write end
    data = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    return data.decode("utf-8", errors="replace").splitlines()


def _launcher_main(argv: list[str]) -> None:
    config = json.loads(argv[0])
    control = config["control_fd"]
    _set_parent_death_signal()  # die with the harness's thread
    if os.getppid() != config["harness_pid"]:
        os._exit(1)  # the harness died before we could tie ourselves to it
    with open(config["source"], "rb") as f:
        source = f.read().decode("utf-8", errors="surrogatepass")
    os.unlink(config["source"])
    isolation, notes = _isolate(config["namespaces"])
    token = secrets.token_hex(16)  # made here, after the harness, and never written anywhere the program can read
    done_r, done_w = os.pipe()
    child = 0

    def stop(*_):  # the harness asks us to stop (too much output, or its backstop)
        if child:
            os.kill(child, signal.SIGKILL)
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    child = os.fork()
    if child == 0:
        os.close(done_r)
        os.close(control)
        _run_child(config, source, token, done_w)
    os.close(done_w)
    status, timed_out = _wait_for_exit(child, config["deadline"])
    lines = _read_available(done_r)
    setup = json.loads(lines[0][len("setup "):]) if lines and lines[0].startswith("setup ") else {}
    if not isolation["pid_namespace"] and setup.get("uid") is not None:
        _kill_uid(setup["uid"])
    report = {**isolation, "uid": setup.get("uid"), "notes": notes + setup.get("notes", []),
              "finished": token in lines[1:], "exit_code": os.waitstatus_to_exitcode(status), "timeout": timed_out}
    os.write(control, json.dumps(report).encode())
    os._exit(0)


# ---------------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def aggregate_pass_at_k(outcomes: Mapping[str, Sequence[bool]], ks: Iterable[int] = (1,)) -> dict[str, float]:
    """Mean pass@k over tasks (as a fraction) from each task's per-sample pass flags: {"pass@k": value}.

    Every task needs at least k samples for each requested k.
    """
    if not outcomes:
        raise ValueError("no tasks to aggregate")
    result = {}
    for k in ks:
        too_few = [task for task, flags in outcomes.items() if len(flags) < k]
        if too_few:
            raise ValueError(f"pass@{k} needs >= {k} samples per task; {len(too_few)} task(s) have fewer, "
                             f"e.g. {too_few[0]!r}")
        values = [pass_at_k(len(flags), sum(map(bool, flags)), k) for flags in outcomes.values()]
        result[f"pass@{k}"] = sum(values) / len(values)
    return result


if __name__ == "__main__":
    _launcher_main(sys.argv[1:])
