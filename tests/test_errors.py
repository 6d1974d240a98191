"""Clear one-line errors instead of tracebacks or silent wrong output (issue 13, items 2, 3, 6)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from asarm import orders
from asarm.cli import encode_template, main
from asarm.model import ASARM, ModelLoadError, NonFiniteLogitsError, hub_offline
from asarm.paths import data_file

from helpers import tiny_model, use_hub_cache

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, *needles) -> str:
    """The command's report: one line starting with "asarm", no traceback (progress bars aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("asarm")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _inputs(vocab_size=10, length=5):
    tokens = torch.arange(1, length + 1)[None] % vocab_size
    sigma = torch.arange(length)[None]
    return tokens, sigma, torch.tensor([2]), torch.tensor([[2, 3, 4]])


# ---------------------------------------------------------------------------------------- model files
def test_truncated_or_corrupt_weights(tmp_path, capsys):
    path = tmp_path / "m"
    tiny_model().save_pretrained(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated or corrupt"):
        ASARM.from_pretrained(path)
    weights.write_bytes(b"not a safetensors file")
    assert main(["sample", "--model", str(path), "--text", "a <mask>", "--no-progress"]) == 2
    _one_line_error(capsys, str(weights), "truncated or corrupt", "save the model again")


def test_revision_with_a_local_or_embedded_model(tiny_model_dir, capsys):
    with pytest.raises(ValueError, match="applies to Hub models only"):
        ASARM.from_pretrained(tiny_model_dir, revision="nlp")
    with pytest.raises(ValueError, match="'asarm-tiny'"):
        ASARM.from_pretrained("asarm-tiny", revision="nlp")
    assert main(["sample", "--model", str(tiny_model_dir), "--revision", "nlp", "--text", "a <mask>"]) == 2
    _one_line_error(capsys, "revision 'nlp' applies to Hub models only")


# ------------------------------------------------------------------------------------------ offline
class _Unreachable:
    def head(self, *args, **kwargs):
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")


def test_hub_offline_is_one_check(monkeypatch):
    import huggingface_hub.constants

    calls = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.utils.get_session", lambda: calls.append(1) or _Unreachable())
    assert hub_offline() and calls == [1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: no request
    assert hub_offline() and calls == [1]


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    """One failed probe, then every file is looked up in the local cache only (no 5 x 23 s retries)."""
    from transformers import XLNetLMHeadModel

    seen = []

    def from_pretrained(name, **kwargs):
        seen.append(kwargs["local_files_only"])
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr("asarm.model.hub_offline", lambda: True)
    monkeypatch.setattr(XLNetLMHeadModel, "from_pretrained", from_pretrained)
    with pytest.raises(ModelLoadError, match="not reachable and the model is not in the local cache"):
        ASARM.from_pretrained("someone/some-model", revision="nlp")
    assert seen == [True]


def test_hub_model_and_revision_load_from_the_cache_offline(tmp_path, monkeypatch, hub_offline, xlnet_tokenizer):
    """HF_HUB_OFFLINE=1: a Hub name + revision resolves through the local cache (refs/REVISION)."""
    repo = tmp_path / "hub" / "models--someone--asarm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    model = tiny_model(seed=5)
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "nlp").write_text(commit)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    loaded = ASARM.from_pretrained("someone/asarm", revision="nlp", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and the model is not in the local cache"):
        ASARM.from_pretrained("someone/asarm", revision="code", device="cpu")


# ------------------------------------------------------------------------------- token ids, logits
def test_token_ids_outside_the_vocabulary():
    model = tiny_model(vocab_size=10)
    tokens, sigma, n_prompt, queries = _inputs()
    for bad in (10, -1):
        wrong = tokens.clone()
        wrong[0, 1] = bad
        with pytest.raises(ValueError, match=f"token ids {bad} are outside the vocabulary 0..9"):
            model.logits(wrong, sigma, n_prompt, queries)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.log_probs(wrong, sigma, n_prompt, queries)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.score(wrong, sigma, n_prompt)
        with pytest.raises(ValueError, match="outside the vocabulary 0..9"):
            orders.validate_order(wrong, sigma, n_prompt, vocab_size=10)
    wrong = tokens.clone()
    wrong[0, 0] = -5
    with pytest.raises(ValueError, match="token ids -5 are outside the vocabulary"):
        orders.validate_order(wrong, sigma, n_prompt)  # negative ids need no vocabulary size
    from asarm.sampling import sequential_decode

    with pytest.raises(ValueError, match="outside the vocabulary"):
        sequential_decode(model, wrong, sigma, n_prompt, seed=0)


def test_non_finite_logits_stop_the_evaluation_paths():
    model = tiny_model()
    with torch.no_grad():
        model.backbone.hf.transformer.layer[0].ff.layer_1.weight[0, 0] = float("nan")
    tokens, sigma, n_prompt, queries = _inputs()
    for call in (lambda: model.logits(tokens, sigma, n_prompt, queries),
                 lambda: model.log_probs(tokens, sigma, n_prompt, queries),
                 lambda: model.score(tokens, sigma, n_prompt)):
        with pytest.raises(NonFiniteLogitsError, match="logits are not finite.*diverged"):
            call()


def test_sampler_argument_checks():
    from asarm.sampling import assd_decode

    model = tiny_model()
    tokens, sigma, n_prompt, _ = _inputs()
    with pytest.raises(ValueError, match="k must be an integer >= 1, got True"):
        assd_decode(model, tokens, sigma, n_prompt, k=True, seed=0)


# ------------------------------------------------------------------------------------- asarm sample
@pytest.mark.parametrize("tag", ["<mask: 2>", "<mask:-3>", "<mask:0>", "<mask:x>", "<mask >"])
def test_malformed_blank_tags_are_errors(xlnet_tokenizer, tag):
    with pytest.raises(ValueError, match=f"blank tag '{tag}' is not valid: write <mask> or <mask:N> with N >= 1"):
        encode_template(xlnet_tokenizer, f"The cat {tag} on the mat.", 6)


def test_other_angle_brackets_stay_text(xlnet_tokenizer):
    assert 6 not in encode_template(xlnet_tokenizer, "a <masks> and <mask_token> b", 6)


def test_sample_argument_errors(tiny_model_dir, capsys):
    base = ["sample", "--model", str(tiny_model_dir), "--no-progress"]
    assert main(base + ["--text", "The cat <mask:-3> here."]) == 2
    _one_line_error(capsys, "'<mask:-3>'", "<mask:N> with N >= 1")
    for value in ("0", "-2"):
        with pytest.raises(SystemExit) as exit_info:
            main(base + ["--text", "a <mask>", "--batch-size", value])
        assert exit_info.value.code == 2
        assert f"argument --batch-size: must be >= 1, got {int(value)}" in capsys.readouterr().err
    for value in ("inf", "nan", "0"):
        assert main(base + ["--text", "a <mask>", "--temperature", value]) == 2
        _one_line_error(capsys, "--temperature must be a finite number > 0")


def test_blank_longer_than_the_training_length_warns(tmp_path, xlnet_tokenizer, capsys):
    model = ASARM.from_config(tokenizer=xlnet_tokenizer, d_model=16, n_layer=1, n_head=2, d_inner=32, seed=0)
    model.trained_length = 8
    model.save_pretrained(tmp_path / "m")
    assert ASARM.from_pretrained(tmp_path / "m").trained_length == 8
    assert main(["sample", "--model", str(tmp_path / "m"), "--text", "A <mask:10> b.", "--no-progress",
                 "--sampler", "sequential"]) == 0
    _one_line_error(capsys, "warning", "longer than the 8 tokens")
    assert main(["sample", "--model", str(tmp_path / "m"), "--text", "A <mask:3> b.", "--no-progress",
                 "--sampler", "sequential"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_embedded_model_knows_its_training_length(hub_offline):
    assert ASARM.from_pretrained("asarm-tiny", device="cpu").trained_length == 128


# ------------------------------------------------------------------------------------------ training
def test_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1\n  run_dir: x\n")
    assert main(["train", "--config", str(bad)]) == 2
    _one_line_error(capsys, str(bad), "is not valid YAML", "line 3", "fix the file")


def test_empty_data_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("ASARM_DATA_DIR", str(tmp_path / "data"))
    assert main(["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"train.run_dir={tmp_path / 'run'}",
                 "log.progress=false", "log.tensorboard=false"]) == 2
    _one_line_error(capsys, "data.paths: 'wikitext-2/valid.txt'", "ASARM_DATA_DIR", str(tmp_path / "data"))


@pytest.mark.parametrize("text", ["", "  \n\t\n", "one short line\n"])
@pytest.mark.parametrize("tokenizer", ["model.tokenizer_vocab_size=50", "model.tokenizer=xlnet-base-cased"])
def test_empty_blank_or_too_short_training_text(tmp_path, capsys, text, tokenizer):
    """Blank text, or one line that data.heldout_fraction keeps for evaluation, leaves no training
    document: said at once, with or without a tokenizer to train on it."""
    data = tmp_path / "train.txt"
    data.write_text(text)
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {d_model: 16, n_layer: 1, n_head: 2, d_inner: 32}\n"
                      "data: {max_length: 8}\n"
                      "log: {progress: false, tensorboard: false}\n"
                      "train: {max_steps: 1, cpu: true}\n")
    tokenizer = tokenizer.replace("xlnet-base-cased", str(data_file("xlnet-base-cased")))
    assert main(["train", "--config", str(config), f"train.run_dir={tmp_path / 'run'}", f"data.paths=[{data}]",
                 tokenizer]) == 2
    _one_line_error(capsys, str(data), "empty or blank, or too short", "data.heldout_fraction")


def test_run_training_script_takes_an_override_first(tmp_path):
    env = {**os.environ, "NPROC": "1"}
    proc = subprocess.run(["./_run_training.sh", "train.max_steps=20", "train.no_such_key=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "asarm train: error: unknown config key 'train.no_such_key'"
    proc = subprocess.run(["./_run_training.sh", "missing.yaml"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "config file 'missing.yaml' not found" in proc.stderr
