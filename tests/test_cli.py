import torch

from asarm import orders
from asarm.cli import encode_template, main
from asarm.seeds import mix_seed

from helpers import random_head


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


# Two `asarm sample` calls that between them set every option to a value other than its default.
SAMPLE_CALLS = [
    {"--model": "MODEL", "--revision": "nlp", "--device": "cpu", "--text": "One two three four five six.",
     "--masking-rate": "0.5", "--sampler": "assd", "--drafter": "ngram", "--k": "3", "--temperature": "0.7",
     "--temperature-mode": "no_temp_oracle", "--bonus": None, "--adaptive-threshold": "0.2",
     "--draft-temperature-ratio": "1.25", "--r-atol": "0.1", "--seed": "4", "--batch-size": "2", "--engine": "full",
     "--no-progress": None, "--trace": "TRACE", "--show-rounds": None, "--threads": "1"},
    {"--text": "The cat <mask:3> on the mat.", "--sampler": "assd-fused", "--outcomes": "1",
     "--outcome-order": "accepted-first", "--no-progress": None},
    {"--text": "The cat <mask:3> on the mat.", "--sampler": "auto", "--cost-profile": "PROFILE", "--no-progress": None,
     "--debug": None, "--learn-prices": None},
    {"--model": "HEAD_MODEL", "--text": "The cat <mask:3> on the mat.", "--sampler": "assd-fused-head",
     "--proposal-dtype": "bfloat16", "--no-progress": None},
]


def test_every_sample_option_reaches_the_decode(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Every option of `asarm sample` is set by SAMPLE_CALLS (a new option fails here until it is) and arrives
    where it acts: the model loader, the sampler spec, or the decode's own options."""
    import argparse

    import asarm.sampling
    from asarm import cli
    from asarm.model import ASARM

    parser = cli.add_sample_parser(argparse.ArgumentParser().add_subparsers())
    options = {flag for action in parser._actions for flag in action.option_strings} - {"-h", "--help"}
    assert options == set().union(*SAMPLE_CALLS)
    loads, decodes, threads_set = [], [], []
    real_load, real_decode = ASARM.from_pretrained, asarm.sampling.decode

    with_head = real_load(tiny_model_dir, device="cpu")
    with_head.attach_draft_head(random_head(with_head, seed=0)).save_pretrained(tmp_path / "with_head")

    def load(name, revision=None, device=None):
        loads.append((name, revision, device))
        return real_load(tmp_path / "with_head" if name == "head/model" else tiny_model_dir, device=device)

    def decode(model, spec, tokens, sigma, n_prompt, **kw):
        decodes.append((spec, tokens, sigma, n_prompt, kw))
        return real_decode(model, spec, tokens, sigma, n_prompt, **kw)

    monkeypatch.setattr(ASARM, "from_pretrained", load)
    monkeypatch.setattr(asarm.sampling, "decode", decode)
    monkeypatch.setattr("asarm.cli.set_threads", lambda threads: threads_set.append(threads))
    trace = tmp_path / "trace.html"
    for call in SAMPLE_CALLS:
        argv = [part for flag, value in call.items() for part in ([flag] if value is None else [flag, value])]
        argv = [{"MODEL": "some/model", "TRACE": str(trace), "PROFILE": str(tmp_path / "cost.json"),
                 "HEAD_MODEL": "head/model"}.get(part, part) for part in argv]
        assert main(["sample", *argv]) == 0, capsys.readouterr().err
    assert loads == [("some/model", "nlp", "cpu"), ("asarm-tiny", None, None), ("asarm-tiny", None, None),
                     ("head/model", None, None)]
    assert threads_set == [1, None, None, None]  # --threads (--debug only changes how an error is shown)
    (spec, tokens, sigma, n_prompt, kw), (fused, *_, fused_kw), (auto, *_), (head, *_) = decodes
    assert (spec.name, spec.drafter_name, spec.k, spec.temperature, spec.temperature_mode, spec.bonus) == (
        "assd-ngram-bonus-adaptive", "ngram", 3, 0.7, "no_temp_oracle", True)
    assert (spec.draft_length.threshold, spec.draft_temperature_ratio, spec.r_atol) == (0.2, 1.25, 0.1)
    assert tokens.shape[0] == 2  # --batch-size; --masking-rate hides half the tokens:
    assert torch.equal(n_prompt, orders.num_prompt_for_rate(0.5, torch.full((2,), tokens.shape[1])))
    assert (kw["engine"], kw["progress"], kw["trace"]) == ("full", False, True)
    assert torch.equal(kw["seed"], torch.tensor([mix_seed(4, 0), mix_seed(4, 1)]))
    assert trace.stat().st_size > 0
    out = capsys.readouterr().out
    assert "WARNING: r_atol=0.1 > 0: lossy sampling" in out and "round" in out  # --r-atol, --show-rounds
    assert (fused.name, fused.outcomes, fused.outcome_order, fused.k) == ("assd-fused", 1, "accepted-first", 5)
    assert (fused_kw["engine"], fused_kw["trace"], fused_kw["seed"].tolist()) == ("cached", False, [mix_seed(0, 0)])
    # the test model has no draft head: assd-auto drafts with the model's own draft rows
    assert (auto.name, auto.drafter_name, auto.cost_profile, auto.learn_prices) == (
        "assd-auto", "self", str(tmp_path / "cost.json"), True)
    assert (tmp_path / "cost.json").stat().st_size > 0  # the profile measured for the decode was saved there
    assert (head.name, head.proposal_dtype) == ("assd-fused-head", "bfloat16")


def test_sample_refuses_a_setting_its_sampler_ignores(capsys):
    """A setting that means nothing for the chosen sampler is one line, before any model loads."""
    for argv, message in [(["--sampler", "sequential", "--k", "3"], "--k 3 does not apply to --sampler sequential"),
                          (["--sampler", "assd-fused", "--bonus"], "--bonus does not apply to --sampler assd-fused"),
                          (["--outcomes", "2"], "--outcomes 2 does not apply to --sampler assd"),
                          (["--sampler", "assd-fused", "--proposal-dtype", "float16"],
                           "--proposal-dtype float16 does not apply to --sampler assd-fused"),
                          (["--adaptive-threshold", "2"], "--adaptive-threshold is not valid: the adaptive-length "
                                                          "threshold must lie in [0, 1], got 2.0")]:
        assert main(["sample", "--model", "/never/loaded", "--text", "a <mask> b", *argv]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"asarm sample: error: {message}"


def test_train_subcommand_reports_config_errors(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 1\n")
    assert main(["train", "--config", str(bad), "optim.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
