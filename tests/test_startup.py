"""The command line starts without torch: --help and argument errors come back before any heavy import, and
any error that escapes a command is one line (the traceback with --debug)."""

import subprocess
import sys

import pytest

from asarm import cli

HEAVY = ("torch", "transformers", "numpy", "scipy", "accelerate", "tqdm")

# Runs the CLI in a fresh interpreter and prints the heavy modules it imported.
_PROBE = """
import sys
from asarm.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("IMPORTED", sorted({m.split('.')[0] for m in sys.modules} & set(%r)), "CODE", code)
""" % (HEAVY,)


def _probe(*argv):
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120)
    last = done.stdout.strip().splitlines()[-1]
    imported, code = last.removeprefix("IMPORTED ").split(" CODE ")
    return eval(imported), int(code), done.stderr


@pytest.mark.parametrize("argv, code, message", [
    (["--help"], 0, ""),
    (["eval", "speculative", "--help"], 0, ""),
    (["sample", "--text", "The <mask> sat.", "--k", "0"], 2, "--k must be an integer >= 1, got 0"),
    (["sample", "--text", "no blanks here"], 2, "text has no blanks"),
    (["sample", "--text", "The <mask:0> sat."], 2, "is not valid"),
    (["sample", "--text", "The <mask> sat.", "--masking-rate", "0.5"], 2, "not both"),
    (["sample", "--text", "x", "--threads", "0"], 2, "--threads: must be >= 1"),
    (["eval", "speculative", "--start-fraction", "2"], 2, "--start-fraction must lie strictly between 0 and 1"),
    (["eval", "nll", "--length", "1"], 2, "--length must be >= 2"),
    (["eval", "humaneval", "--pass-k", "5"], 2, "--pass-k values must lie in [1, 1]"),
    (["eval", "rocstories", "--settings", "9/5"], 2, "ROCStories setting"),
    (["eval", "lm-tasks", "--tasks", "nope"], 2, "task"),
    (["eval", "speculative", "--samplers", "nope"], 2, "nope"),
])
def test_help_and_argument_errors_import_nothing_heavy(argv, code, message):
    imported, returned, stderr = _probe(*argv)
    assert returned == code, stderr
    assert imported == [], f"{argv} imported {imported}"
    if message:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], stderr


def _failing_command(error):
    def run(args):
        raise error
    return run


def _run_with(monkeypatch, error, *argv):
    monkeypatch.setattr(cli, "_run_sample", _failing_command(error))
    return cli.main(["sample", "--text", "The <mask> sat.", *argv])


def test_an_unexpected_error_is_one_line_with_the_debug_hint(monkeypatch, capsys):
    assert _run_with(monkeypatch, RuntimeError("the engine\nbroke")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("asarm sample: error: RuntimeError: the engine broke (rerun with --debug")


def test_a_value_error_is_one_line_with_exit_code_2(monkeypatch, capsys):
    assert _run_with(monkeypatch, ValueError("--k is bad")) == 2
    assert capsys.readouterr().err == "asarm sample: error: --k is bad\n"


@pytest.mark.parametrize("where", ["top", "subcommand"])
def test_debug_shows_the_traceback(monkeypatch, where):
    monkeypatch.setattr(cli, "_run_sample", _failing_command(RuntimeError("boom")))
    argv = ["sample", "--text", "The <mask> sat.", "--debug"] if where == "subcommand" else \
        ["--debug", "sample", "--text", "The <mask> sat."]
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(argv)


def test_interrupt_is_one_line(monkeypatch, capsys):
    assert _run_with(monkeypatch, KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "asarm sample: interrupted\n"


def test_every_command_takes_threads():
    parser = cli.build_parser()
    commands = [["sample", "--text", "x"], ["profile"], ["train", "--config", "c.yaml"],
                ["train-draft-head", "--config", "c.yaml"]] + [["eval", name] for name in cli.EVALUATIONS]
    for argv in commands:
        assert parser.parse_args([*argv, "--threads", "3"]).threads == 3, argv


def test_visible_tokens_agree_with_orders():
    from asarm import orders
    from asarm.eval.commands import _visible_tokens

    for length in (2, 7, 100, 128, 512):
        for rate in (0.05, 0.29, 0.5, 0.95, 0.999):
            assert _visible_tokens(length, rate) == int(orders.num_prompt_for_rate(rate, length))
