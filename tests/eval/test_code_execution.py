import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from asarm.eval import code_execution
from asarm.eval.code_execution import (SandboxLimits, aggregate_pass_at_k, pass_at_k, probe_sandbox, run_program,
                                       run_programs)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the sandbox's notes on missing isolation


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (5, 0, 3, 0.0),
    (5, 5, 1, 1.0),
    (5, 1, 5, 1.0),  # k = n: any pass among all samples
    (5, 0, 5, 0.0),
    (1, 1, 1, 1.0),
    (10, 3, 4, 1 - math.comb(7, 4) / math.comb(10, 4)),
    (200, 10, 100, 1 - math.comb(190, 100) / math.comb(200, 100)),
])
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n, c, k", [(5, 2, 6), (5, 2, 0), (5, 6, 1), (5, -1, 1)])
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_aggregate_pass_at_k():
    outcomes = {"a": [True, False, False, False, False], "b": [True, True, False, False, False]}
    result = aggregate_pass_at_k(outcomes, ks=(1, 5))
    assert result["pass@1"] == pytest.approx(0.3)
    assert result["pass@5"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="pass@6"):
        aggregate_pass_at_k(outcomes, ks=(6,))
    with pytest.raises(ValueError):
        aggregate_pass_at_k({})



@pytest.fixture(scope="module")
def isolation():
    return probe_sandbox()


@pytest.fixture(scope="module")
def drop_dir():
    """A directory every uid may write to: sandboxed programs leave their host pids there."""
    path = tempfile.mkdtemp(prefix="asarm-test-drop-")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def listener():
    """A TCP port on 127.0.0.1 that the network-hostile program tries to reach."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server


def _host_pid_line(drop_dir, name):
    # /proc is the host's, so /proc/self names the process by its pid outside any PID namespace
    return f"open({os.path.join(drop_dir, name)!r}, 'w').write(os.readlink('/proc/self'))"


def _wait_until_gone(pid, seconds=5.0):
    """True once ``pid`` no longer runs (it may stay a zombie until its new parent reaps it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def hostile_programs(drop_dir, port):
    harness = os.getpid()
    return {
        # leaves a child that escapes the process group and ignores polite signals
        "orphan": textwrap.dedent(f"""\
            import os, signal, time
            if os.fork() == 0:
                os.setsid()
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                {_host_pid_line(drop_dir, "orphan.pid")}
                while True:
                    time.sleep(0.1)
            while not os.path.exists({os.path.join(drop_dir, "orphan.pid")!r}):
                time.sleep(0.01)
            time.sleep(0.05)"""),
        "delete_parent": textwrap.dedent("""\
            import os, shutil
            parent = os.path.dirname(os.getcwd())
            for name in os.listdir(parent) if os.access(parent, os.R_OK) else []:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            shutil.rmtree(parent, ignore_errors=True)
            for name in ("stdout", "stderr", "program.py"):
                try:
                    os.remove(os.path.join(parent, name))
                except OSError:
                    pass"""),
        "kill_harness": textwrap.dedent(f"""\
            import os, signal
            for attack in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.kill({harness}, signal.SIGKILL),
                           lambda: os.killpg({os.getpgid(harness)}, signal.SIGKILL),
                           lambda: os.kill(0, signal.SIGKILL)):
                try:
                    attack()
                except OSError:
                    pass"""),
        "trace_harness": textwrap.dedent(f"""\
            import ctypes, os
            reached = []
            for name in ("environ", "mem", "fd/0"):
                try:
                    open(f"/proc/{harness}/{{name}}", "rb").read(1)
                    reached.append(name)
                except OSError:
                    pass
            if ctypes.CDLL(None).ptrace(16, {harness}, 0, 0) == 0:  # PTRACE_ATTACH
                reached.append("ptrace")
            assert not reached, reached"""),
        "fork_bomb": textwrap.dedent("""\
            import os, time
            n = 0
            try:
                while n < 300:
                    if os.fork() == 0:
                        time.sleep(60)
                        os._exit(0)
                    n += 1
            except OSError:
                pass
            assert n < 32, f"{n} processes started under a limit of 32" """),
        "network": textwrap.dedent(f"""\
            import subprocess, sys
            # a fresh interpreter does not have the socket patch: only the network namespace stops it
            code = "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
            r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True)
            assert r.returncode != 0, "connected to the harness's port" """),
        "huge_output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
        "memory_hog": "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))",
        "exit_before_asserts": "import sys\nsys.exit(0)\nassert False",
        "os_exit_before_asserts": "import os\nos._exit(0)\nassert False",
        "parent_exits_child_runs_asserts": "import os, time\nif os.fork():\n    os._exit(0)\ntime.sleep(0.3)",
        "forked_copy_finishes": "import os\npid = os.fork()\nif pid:\n    os.waitpid(pid, 0)\n    os._exit(0)",
        "fake_sentinel": ("import os\nfor fd in range(3, 64):\n    try:\n"
                          "        os.write(fd, b'asarm-finished\\n' * 4)\n"
                          "    except OSError:\n        pass\nos._exit(0)"),
        "surrogate": "x = '\ud800'\nprint(x)",
        "null_byte": "x = 1\0",
        "big_but_fine": "print('y' * (1 << 20))",
    }


# what each hostile program gets when the sandbox works; "either" where the attack's own effect decides
HOSTILE_EXPECTED = {"orphan": "passed", "delete_parent": "passed", "kill_harness": "either",
                    "trace_harness": "passed", "fork_bomb": "passed", "network": "passed", "huge_output": "failed",
                    "memory_hog": "failed", "exit_before_asserts": "failed", "os_exit_before_asserts": "failed",
                    "parent_exits_child_runs_asserts": "failed", "forked_copy_finishes": "failed",
                    "fake_sentinel": "failed", "surrogate": "failed", "null_byte": "failed", "big_but_fine": "passed"}
CONTROLS = {"ok": ("assert sum(range(4)) == 6", "passed"), "wrong": ("assert sum(range(4)) == 7", "failed")}


@pytest.fixture(scope="module")
def hostile(isolation, drop_dir, listener):
    if not (isolation["pid_namespace"] or isolation["uid"] is not None):
        pytest.skip("neither a PID namespace nor a separate uid here: hostile programs could kill the test run")
    programs = hostile_programs(drop_dir, listener.getsockname()[1])
    # every hostile program is followed by a control task whose verdict must not change
    jobs = []
    for i, (name, program) in enumerate(programs.items()):
        control = "ok" if i % 2 == 0 else "wrong"
        jobs += [(name, program), (control, CONTROLS[control][0])]
    limits = SandboxLimits(memory_mb=512, max_processes=32, max_output_mb=4, max_output_chars=300)
    start = time.monotonic()
    results = run_programs([program for _, program in jobs], timeout=2.0, workers=2, limits=limits)
    return [(name, r) for (name, _), r in zip(jobs, results)], time.monotonic() - start


def test_hostile_programs_get_their_verdicts_and_leave_later_tasks_alone(hostile, isolation):
    results, _ = hostile
    for i, (name, r) in enumerate(results):
        expected = CONTROLS[name][1] if name in CONTROLS else HOSTILE_EXPECTED[name]
        if name == "network" and not isolation["network_namespace"]:
            continue  # only the Python patch stands in the way, and a subprocess bypasses it
        if name == "trace_harness" and isolation["uid"] is None:
            continue  # root in a PID namespace still reads /proc of the harness
        if expected != "either":
            assert r.status == expected, (i, name, r)
        assert r.passed == (r.status == "passed") and (r.passed or r.error), (name, r)


def test_no_program_reached_the_harness_port(hostile, listener, isolation):
    if not isolation["network_namespace"]:
        pytest.skip("no network namespace here")
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_early_exits_say_why(hostile):
    errors = {name: r.error for name, r in hostile[0]}
    assert "exit(0) before finishing" in errors["exit_before_asserts"]
    assert "exited with code 0 before the end" in errors["os_exit_before_asserts"]
    assert "output over the 4 MB limit" in errors["huge_output"]
    assert "MemoryError" in errors["memory_hog"]
    assert "null bytes" in errors["null_byte"] and "surrogates not allowed" in errors["surrogate"]


def test_orphans_and_fork_bomb_children_are_gone(hostile, drop_dir):
    with open(os.path.join(drop_dir, "orphan.pid")) as f:
        orphan = int(f.read())
    assert _wait_until_gone(orphan), f"the program's child {orphan} (own session) still runs"


def test_hostile_batch_is_quick(hostile):
    _, seconds = hostile
    assert seconds < 30  # infinite output and memory hogs are stopped early, not only at the timeout


def test_probe_reports_isolation(isolation):
    assert set(isolation) == {"network_namespace", "pid_namespace", "uid", "notes"}
    if os.geteuid() == 0 and sys.platform.startswith("linux"):
        assert isolation["uid"] == SandboxLimits().sandbox_uid  # the first slot


def test_harness_death_kills_the_program(drop_dir):
    """The program (and what it forked) dies with a harness that is killed mid-run."""
    script = textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(code_execution.__file__))!r})
        from asarm.eval.code_execution import run_program
        run_program('''import os, time
        if os.fork() == 0:
            os.setsid()
        open(os.path.join({drop_dir!r}, "harness-death-%d" % os.getpid()), "w").write(os.readlink("/proc/self"))
        time.sleep(60)''', timeout=30)
    """)
    harness = subprocess.Popen([sys.executable, "-c", script])
    pids = []
    try:
        deadline = time.monotonic() + 10
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [int(open(os.path.join(drop_dir, n)).read() or 0) for n in os.listdir(drop_dir)
                    if n.startswith("harness-death-")]
            pids = [p for p in pids if p]
        assert len(pids) == 2, "the program did not start"
    finally:
        harness.kill()
        harness.wait()
    for pid in pids:
        assert _wait_until_gone(pid), f"process {pid} outlived the harness"


def test_without_isolation_the_harness_still_survives():
    """The fall-back (no namespaces, the harness's own user): files are gone, the run goes on."""
    limits = SandboxLimits(namespaces=False, sandbox_uid=None, max_processes=None)
    report = probe_sandbox(limits)
    assert not report["network_namespace"] and not report["pid_namespace"] and report["uid"] is None
    assert any("namespaces switched off" in note for note in report["notes"])
    programs = [hostile_programs("/nonexistent", 1)["delete_parent"], "import socket\nsocket.socket()",
                "import sys\nsys.exit(0)", CONTROLS["ok"][0], CONTROLS["wrong"][0]]
    results = run_programs(programs, timeout=3.0, workers=2, limits=limits)
    assert [r.status for r in results] == ["passed", "failed", "failed", "passed", "failed"]
    assert "network access is disabled" in results[1].error


PROGRAMS = {
    "ok": "print('hello')",
    "assert": "assert 1 + 1 == 3, 'arithmetic'",
    "loop": "while True:\n    pass",
    "socket": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
    "dns": "import socket\nsocket.getaddrinfo('example.com', 80)",
    "raw_socket": "import _socket\n_socket.socket()",
    "sys_exit": "import sys\nsys.exit(0)\nassert False",
    "os_exit": "import os\nos._exit(0)",
    "memory": "x = bytearray(1 << 30)",
    "stdin": "input()",
    "noisy_failure": "import sys\nsys.stderr.write('x' * 100000)\nraise ValueError('the end')",
    "cwd_env": ("import os\nassert os.listdir('.') == [], os.listdir('.')\n"
                "allowed = {'PATH', 'HOME', 'TMPDIR', 'LC_ALL', 'OMP_NUM_THREADS', 'LANG', 'LC_CTYPE'}\n"
                "assert set(os.environ) <= allowed, sorted(os.environ)\nopen('scratch.txt', 'w').write('fine')\n"
                "import tempfile\ntempfile.NamedTemporaryFile(dir=os.environ['TMPDIR']).close()"),
}


@pytest.fixture(scope="module")
def results():
    limits = SandboxLimits(memory_mb=512, max_output_chars=300)
    out = run_programs(list(PROGRAMS.values()), timeout=2.0, workers=2, limits=limits)
    return dict(zip(PROGRAMS, out))


def test_passing_program(results):
    r = results["ok"]
    assert (r.passed, r.status, r.error) == (True, "passed", "")


def test_failing_program_reports_the_error_tail(results):
    r = results["assert"]
    assert (r.passed, r.status) == (False, "failed")
    assert "AssertionError: arithmetic" in r.error
    assert 'File "program.py", line 1' in r.error  # line numbers of the program itself
    assert "code_execution.py" not in r.error  # no frames of the sandbox


def test_infinite_loop_times_out(results):
    r = results["loop"]
    assert (r.passed, r.status) == (False, "timeout")
    assert r.duration < 5


@pytest.mark.parametrize("name", ["socket", "dns", "raw_socket"])
def test_network_is_blocked(results, name):
    r = results[name]
    assert r.status == "failed"
    assert "network access is disabled" in r.error


@pytest.mark.parametrize("name", ["sys_exit", "os_exit"])
def test_exiting_early_is_not_a_pass(results, name):
    assert results[name].status == "failed"


def test_memory_limit(results):
    r = results["memory"]
    assert r.status == "failed"
    assert "MemoryError" in r.error


def test_stdin_is_empty(results):
    assert "EOFError" in results["stdin"].error


def test_output_is_truncated(results):
    r = results["noisy_failure"]
    assert r.status == "failed"
    assert len(r.error) == 300
    assert r.error.endswith("ValueError: the end\n")


def test_fresh_directory_and_minimal_environment(results):
    assert results["cwd_env"].passed, results["cwd_env"].error


@pytest.mark.parametrize("call, message", [
    (lambda: run_program("pass", timeout=0), "timeout must be a positive number"),
    (lambda: run_program("pass", timeout=float("nan")), "timeout must be a positive number"),
    (lambda: run_program("pass", timeout=True), "timeout must be a positive number"),
    (lambda: run_program(b"pass"), "program must be a str, got bytes"),
    (lambda: run_program("pass", limits={"memory_mb": 1}), "limits must be a SandboxLimits"),
    (lambda: run_programs(["pass", None]), "program must be a str, got NoneType"),
    (lambda: run_programs(["pass"], workers=0), "workers must be a positive integer"),
    (lambda: SandboxLimits(memory_mb=0), "SandboxLimits.memory_mb must be a positive integer or None"),
    (lambda: SandboxLimits(max_output_chars=None), "SandboxLimits.max_output_chars must be a positive integer"),
    (lambda: SandboxLimits(namespaces="yes"), "SandboxLimits.namespaces must be True or False"),
])
def test_bad_input_is_a_one_line_error(call, message):
    with pytest.raises((ValueError, TypeError)) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_results_keep_program_order():
    programs = [f"assert {i} % 2 == 0" for i in range(4)]
    assert [r.passed for r in run_programs(programs, workers=2)] == [True, False, True, False]


def test_uses_this_interpreter():
    assert run_program(f"import sys\nassert sys.version == {sys.version!r}").passed
