"""Run untrusted Python programs in subprocesses, and the unbiased pass@k estimator.

Each program runs in its own ``python -I`` subprocess, in a fresh temporary directory as cwd, with a
minimal environment, stdin on /dev/null, stdout/stderr captured to files (bounded by the file-size
limit) and reported as a truncated tail. A wall-clock timeout kills the whole process group. Before
the program, a small prelude sets resource limits (address space, CPU seconds, file size, number of
processes, no core files) where the platform has them and makes socket creation and DNS look-ups
raise ``OSError``.

The limits are set inside the child rather than in a ``preexec_fn``, because ``preexec_fn`` is not
safe in a process with threads and ``run_programs`` starts programs from a thread pool.

This is a guard against accidents (runaway loops, memory blow-ups, stray network use), NOT a security
boundary: a program can undo the socket patch, reach the network through a child process, or touch
files outside its directory. Run code you do not trust inside a container or VM as well.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = ["SandboxLimits", "ExecutionResult", "run_program", "run_programs", "pass_at_k",
           "aggregate_pass_at_k"]

_PRELUDE = """\
try:
    import resource
except ImportError:
    resource = None
if resource is not None:
    for _name, _soft, _hard in {limits!r}:
        if hasattr(resource, _name):
            try:
                resource.setrlimit(getattr(resource, _name), (_soft, _hard))
            except (ValueError, OSError):
                pass

import socket, _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the asarm execution sandbox")
socket.socket.__init__ = _no_network
class _NoSocket(_socket.socket):
    __init__ = _no_network
_socket.socket = _socket.SocketType = _NoSocket
for _module in (socket, _socket):
    for _attr in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "create_connection"):
        if hasattr(_module, _attr):
            setattr(_module, _attr, _no_network)

with open({path!r}, encoding="utf-8") as _file:
    _code = compile(_file.read(), "program.py", "exec")
try:
    exec(_code, {{"__name__": "__main__"}})
except SystemExit as _exit:
    raise RuntimeError(f"the program called exit({{_exit.code!r}}) before finishing") from None
print({sentinel!r}, flush=True)
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits; None leaves a limit unset. CPU seconds follow from the timeout.

    ``max_processes`` sets RLIMIT_NPROC, which Linux counts per user (all of that user's processes
    and threads, not only this program's) and does not enforce for root: a fork-bomb brake only.
    """

    memory_mb: int | None = 1024
    file_size_mb: int | None = 16
    max_processes: int | None = 256
    max_output_chars: int = 2000


@dataclass(frozen=True)
class ExecutionResult:
    """``status`` is "passed" (ran to the end, exit code 0), "failed" or "timeout"; ``error`` is
    the tail of stderr (or the reason) for a program that did not pass."""

    passed: bool
    status: str
    error: str
    duration: float


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


def _tail(path: Path, n_chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4 * n_chars))  # a UTF-8 character has at most 4 bytes
        text = f.read().decode("utf-8", errors="replace")
    return text[-n_chars:] if n_chars > 0 else ""


def _kill_group(proc: subprocess.Popen) -> None:
    if os.name == "posix":
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        proc.kill()


def run_program(program: str, timeout: float = 3.0, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run one program (its text) in a sandboxed subprocess; see the module docstring.

    ``timeout`` is wall-clock seconds including the interpreter's start-up (tens of ms when idle).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    with tempfile.TemporaryDirectory(prefix="asarm-exec-") as tmp:
        root = Path(tmp)
        workdir = root / "work"
        workdir.mkdir()
        source = root / "program.py"
        source.write_text(program, encoding="utf-8")
        sentinel = f"asarm-finished-{secrets.token_hex(8)}"
        prelude = _PRELUDE.format(limits=_rlimits(timeout, limits), path=str(source), sentinel=sentinel)
        env = {"PATH": os.defpath, "HOME": str(workdir), "TMPDIR": str(workdir), "LC_ALL": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-X", "utf8", "-c", prelude], cwd=workdir, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=(os.name == "posix"))
            try:
                returncode = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)  # also ends children that outlived the program
            proc.wait()
        duration = time.monotonic() - start
        stdout = _tail(root / "stdout", len(sentinel) + 2)
        stderr = _tail(root / "stderr", limits.max_output_chars)
    if timed_out:
        return ExecutionResult(False, "timeout", f"timed out after {timeout:g} s", duration)
    if returncode == 0 and stdout.rstrip().endswith(sentinel):
        return ExecutionResult(True, "passed", "", duration)
    if not stderr.strip():
        stderr = (f"killed by signal {-returncode}" if returncode < 0 else
                  f"exit code {returncode} before the end of the program")
    return ExecutionResult(False, "failed", stderr, duration)


def run_programs(programs: Sequence[str], timeout: float = 3.0, workers: int | None = None,
                 limits: SandboxLimits = SandboxLimits()) -> list[ExecutionResult]:
    """``run_program`` on each program, ``workers`` at a time (default: the CPU count); results in order."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda program: run_program(program, timeout, limits), programs))


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
