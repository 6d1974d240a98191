import subprocess
import sys

import pytest

from asarm.cli import encode_template, main


def test_encode_template(xlnet_tokenizer):
    ids = encode_template(xlnet_tokenizer, "Hello <mask:3> world <mask>", 6)
    assert ids == xlnet_tokenizer("Hello", add_special_tokens=False)["input_ids"] + [6, 6, 6] + \
        xlnet_tokenizer(" world", add_special_tokens=False)["input_ids"] + [6]


def test_sample_fills_blanks_and_reports_nfe(tiny_model_dir, capsys):
    code = main(["sample", "--model", str(tiny_model_dir), "--text", "The cat <mask:4> on the mat.", "--k", "3",
                 "--batch-size", "3", "--seed", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 3 and all("nfe=" in line and "tokens/round=" in line for line in lines)
    assert "<mask>" in out.splitlines()[0]  # the prompt line shows the blanks
    nfes = [int(line.split("nfe=")[1].split()[0]) for line in lines]
    assert all(1 <= n <= 4 for n in nfes)


def test_sample_sequential_with_masking_rate(tiny_model_dir, capsys):
    code = main(["sample", "--model", str(tiny_model_dir), "--text", "One two three four five six seven eight.",
                 "--masking-rate", "0.5", "--sampler", "sequential", "--no-progress"])
    assert code == 0
    assert "rounds=" in capsys.readouterr().out


def test_sample_errors(tiny_model_dir, capsys):
    assert main(["sample", "--model", str(tiny_model_dir), "--text", "no blanks here", "--no-progress"]) == 2
    assert "no blanks" in capsys.readouterr().err
    assert main(["sample", "--model", str(tiny_model_dir), "--text", "a <mask> b", "--k", "0", "--no-progress"]) == 2
    assert "k must be" in capsys.readouterr().err
    assert main(["sample", "--model", str(tiny_model_dir / "nope"), "--text", "a <mask>"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "asarm.cli", "sample", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in ["--model", "--revision", "--text", "--masking-rate", "--sampler", "--drafter", "--k",
                   "--temperature", "--temperature-mode", "--r-atol", "--seed", "--batch-size", "--engine",
                   "--device"]:
        assert option in out


def test_train_subcommand_reports_config_errors(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 1\n")
    assert main(["train", "--config", str(bad), "optim.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
