import math
import os
import sys
import time

import pytest

from asarm.eval.code_execution import SandboxLimits, aggregate_pass_at_k, pass_at_k, run_program, run_programs


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
                "assert set(os.environ) <= allowed, sorted(os.environ)\nopen('scratch.txt', 'w').write('fine')"),
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


@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")
def test_children_are_killed_with_the_program(tmp_path):
    pid_file = tmp_path / "child.pid"
    program = ("import os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\n    os._exit(0)\n"
               f"open({str(pid_file)!r}, 'w').write(str(pid))\n")
    assert run_program(program, timeout=5.0, limits=SandboxLimits(max_processes=None)).passed
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":  # killed, not yet reaped by init
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"child {child} of the program is still running")


def test_bad_timeout():
    with pytest.raises(ValueError):
        run_program("pass", timeout=0)


def test_results_keep_program_order():
    programs = [f"assert {i} % 2 == 0" for i in range(4)]
    assert [r.passed for r in run_programs(programs, workers=2)] == [True, False, True, False]


def test_uses_this_interpreter():
    assert run_program(f"import sys\nassert sys.version == {sys.version!r}").passed
