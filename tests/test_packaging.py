"""Packaging: the core dependencies of pyproject.toml are enough to import asarm and sample; what only
training or evaluation needs lives in the extras and is imported lazily."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Import names of the packages that only the extras (train, eval, dev, wandb) install.
EXTRA_MODULES = {"accelerate", "datasets", "tensorboard", "rouge_score", "matplotlib", "pytest", "ruff", "lm_eval",
                 "wandb"}

# Any `import X` / `from X import ...` executed by asarm's own code raises for X in EXTRA_MODULES (imports
# that transformers makes for itself are left alone), then the embedded model samples through the CLI.
CORE_ONLY = textwrap.dedent("""
    import builtins, sys
    blocked, real_import = set(sys.argv[1].split(",")), builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__", "")
        if level == 0 and importer.split(".")[0] == "asarm" and name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"{importer} imports {name}, which only an extra installs")
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded_import
    import asarm.sampling, asarm.eval.stats, asarm.eval.arguments, asarm.eval.record
    from asarm.cli import main
    sys.exit(main(["sample", "--text", "The cat <mask:3> on the mat.", "--k", "2", "--device", "cpu",
                   "--no-progress"]))
""")


def test_sampling_needs_only_the_core_dependencies():
    done = subprocess.run([sys.executable, "-c", CORE_ONLY, ",".join(sorted(EXTRA_MODULES))], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nfe=" in done.stdout


def _requirement_names(requirements):
    return {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for r in requirements}


def test_torch_is_a_range_in_the_library_and_pinned_for_ci():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_requirement = [r for r in project["dependencies"] if _requirement_names([r]) == {"torch"}]
    assert torch_requirement == ["torch>=2.1"]
    extras = project["optional-dependencies"]
    assert {"train", "eval", "dev", "wandb"} <= set(extras)
    core = _requirement_names(project["dependencies"])
    assert not core & {"accelerate", "datasets", "tensorboard", "rouge-score", "matplotlib", "pytest", "ruff"}
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert "torch==2.13.0" in lines and "-e .[train,eval,dev,wandb]" in lines


def test_ci_script_lints_then_runs_the_readme_test_command(tmp_path):
    # .ci/run with `python3` stubbed to log its arguments: install, lint, then exactly the README's command.
    log, stub = tmp_path / "calls", tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    # then the lowest-transformers job, which stops here: the stub makes no venv
    subprocess.run(["bash", str(ROOT / ".ci" / "run")], timeout=60, env={"PATH": f"{stub.parent}:/usr/bin:/bin"})
    calls = log.read_text().splitlines()
    assert calls[:3] == [
        "-m pip install -q --disable-pip-version-check -r requirements.txt", "-m ruff check .",
        "-m pytest -q -m not slow"]
    assert calls[3].startswith("-m venv --system-site-packages") and len(calls) == 4
    assert 'python3 -m pytest -q -m "not slow"' in (ROOT / "README.md").read_text()
