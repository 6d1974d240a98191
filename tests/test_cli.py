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


def test_sample_with_the_embedded_draft_head(capsys):
    """`asarm sample --sampler assd-fused --drafter head` on asarm-tiny (which ships a head); a drafter that the
    sampler cannot use is one line."""
    code = main(["sample", "--text", "The cat <mask:6> on the mat.", "--sampler", "assd-fused", "--drafter", "head",
                 "--k", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "nfe=" in out and "tokens/call=" in out
    assert main(["sample", "--text", "a <mask> b", "--sampler", "assd-fused", "--drafter", "ngram"]) == 2
    assert "--drafter ngram does not apply to --sampler assd-fused" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["sample", "--text", "a <mask> b", "--sampler", "sequential", "--drafter", "head"]) == 2
    assert "does not apply to --sampler sequential" in capsys.readouterr().err


def test_sample_errors(tiny_model_dir, capsys):
    assert main(["sample", "--model", str(tiny_model_dir), "--text", "no blanks here", "--no-progress"]) == 2
    assert "no blanks" in capsys.readouterr().err
    assert main(["sample", "--model", str(tiny_model_dir), "--text", "a <mask> b", "--k", "0", "--no-progress"]) == 2
    assert "k must be" in capsys.readouterr().err
    assert main(["sample", "--model", str(tiny_model_dir / "nope"), "--text", "a <mask>"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_sample_option_reaches_the_sampler(monkeypatch):
    import inspect

    from asarm import cli

    calls = []
    signature = inspect.signature(cli.sample)
    monkeypatch.setattr(cli, "sample", lambda *a, **kw: calls.append(signature.bind(*a, **kw).arguments))
    options = {"--model": "some/model", "--revision": "nlp", "--text": "a <mask> b", "--masking-rate": None,
               "--sampler": "assd", "--drafter": "ngram", "--k": "3", "--temperature": "0.7",
               "--temperature-mode": "no_temp_oracle", "--r-atol": "0.1", "--seed": "4", "--batch-size": "2",
               "--engine": "full", "--device": "cpu"}
    argv = [part for option, value in options.items() if value is not None for part in (option, value)]
    assert main(["sample", *argv, "--bonus", "--no-progress"]) == 0
    got = calls[0]
    assert (got["model"], got["revision"], got["text"], got["sampler"], got["drafter"], got["k"]) == (
        "some/model", "nlp", "a <mask> b", "assd", "ngram", 3)
    assert (got["temperature"], got["temperature_mode"], got["r_atol"], got["seed"], got["batch_size"]) == (
        0.7, "no_temp_oracle", 0.1, 4, 2)
    assert (got["engine"], got["device"], got["progress"], got["bonus"]) == ("full", "cpu", False, True)
    # defaults, parsed
    calls.clear()
    assert main(["sample", "--text", "a <mask> b"]) == 0
    got = calls[0]
    assert (got["model"], got["sampler"], got["k"], got.get("masking_rate"), got["progress"]) == (
        "asarm-tiny", "assd", 5, None, True)


def test_train_subcommand_reports_config_errors(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 1\n")
    assert main(["train", "--config", str(bad), "optim.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
