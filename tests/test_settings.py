"""Every setting is checked, naming itself and its value, before anything is built or loaded (issue 23, item 2):
training configs on both backbones, a backbone built from a config in Python, and the sampling options of
`asarm sample` and `asarm eval speculative`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import asarm.training.trainer
from asarm.cli import main
from asarm.model import ASARM
from asarm.sampling.spec import SamplerSpec, SettingError

REPO = Path(__file__).resolve().parents[1]
XLNET_CONFIG = REPO / "configs" / "tiny_cpu.yaml"  # d_model 256, n_head 4, max_length 128
ROPE_CONFIG = REPO / "configs" / "tiny_cpu_rope.yaml"  # the same sizes on the rotary backbone


def _refused_in_one_line(capsys, code: int, needle: str) -> str:
    """Exit code 2 and exactly one line on stderr, naming ``needle``, with no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Building a trainer or loading a model fails the test (and keeps a check that let a value through from
    starting a real run)."""
    built = []

    def refuse(*args, **kwargs):
        built.append(args)
        raise AssertionError("built despite a bad setting")

    monkeypatch.setattr(asarm.training.trainer, "Trainer", refuse)
    monkeypatch.setattr(ASARM, "from_pretrained", refuse)
    monkeypatch.setattr(ASARM, "from_config", refuse)
    return built


# (overrides, what the one line must contain: the setting and its value)
TRAIN_SETTINGS = [
    (["model.d_model=130"], "model.d_model=130 must be a multiple of model.n_head=4"),
    (["model.n_head=3"], "model.n_head=3"),
    (["model.n_head=0"], "model.n_head=0"),
    (["model.n_layer=0"], "model.n_layer=0"),
    (["model.d_inner=-4"], "model.d_inner=-4"),
    (["model.dropout=1.5"], "model.dropout=1.5"),
    (["model.dropout=-0.1"], "model.dropout=-0.1"),
    (["model.init_std=-0.5"], "model.init_std=-0.5"),
    (["model.backbone=gpt"], "model.backbone"),
    (["model.tokenizer_vocab_size=10"], "model.tokenizer_vocab_size=10"),
    (["model.tokenizer_vocab_size=-1"], "model.tokenizer_vocab_size=-1"),
    (["model.tokenizer_max_documents=0"], "model.tokenizer_max_documents=0"),
    (["data.source=csv"], "data.source='csv'"),
    (["data.source=hub", "data.hub_preset=nowhere"], "data.hub_preset='nowhere'"),
    (["data.unit=word"], "data.unit='word'"),
    (["data.heldout_mode=random"], "data.heldout_mode='random'"),
    (["data.heldout_fraction=1.0"], "data.heldout_fraction=1.0"),
    (["data.heldout_fraction=0"], "data.heldout_fraction=0"),  # the evaluations need held-out text
    (["data.max_length=1"], "data.max_length=1"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["data.epochs=0"], "data.epochs=0"),
    (["optim.lr=0"], "optim.lr=0"),
    (["optim.lr=-1e-3"], "optim.lr=-0.001"),
    (["optim.lr=.inf"], "optim.lr=inf"),
    (["optim.lr_reference_batch=0"], "optim.lr_reference_batch=0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas=1.0"),
    (["optim.eps=0"], "optim.eps=0"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1"),
    (["optim.decay=cosine"], "optim.decay='cosine'"),
    (["optim.grad_clip=.nan"], "optim.grad_clip=nan"),
    (["masking.start_masking_rate=0"], "masking.start_masking_rate=0"),
    (["masking.final_min_masking_rate=1.0"], "masking.final_min_masking_rate=1.0"),
    (["masking.final_max_masking_rate=1.5"], "masking.final_max_masking_rate=1.5"),
    (["masking.final_min_masking_rate=0.995"], "masking.final_min_masking_rate=0.995 must not exceed "
                                               "masking.final_max_masking_rate=0.99"),
    (["masking.masking_warmup_steps=-1"], "masking.masking_warmup_steps=-1"),
    (["masking.objective=both"], "masking.objective='both'"),
    (["masking.order=random"], "masking.order='random'"),
    (["masking.prompt_attn=all"], "masking.prompt_attn='all'"),
    (["masking.loss_scale=log"], "masking.loss_scale='log'"),
    (["masking.reduction=max"], "masking.reduction='max'"),
    (["masking.min_prompt=0"], "masking.min_prompt=0"),
    (["masking.min_prompt=128"], "masking.min_prompt=128 leaves nothing to predict in data.max_length=128"),
    (["eval.every=-1"], "eval.every=-1"),
    (["eval.batches=0"], "eval.batches=0"),
    (["eval.batch_size=0"], "eval.batch_size=0"),
    (["eval.masking_rate=1.0"], "eval.masking_rate=1.0"),
    (["eval.seed=-1"], "eval.seed=-1"),
    (["eval.samples=-1"], "eval.samples=-1"),
    (["eval.sample_k=0"], "eval.sample_k=0"),
    (["log.every=0"], "log.every=0"),
    (["train.seed=-1"], "train.seed=-1"),
    (["train.max_steps=0"], "train.max_steps=0"),
    (["train.stop_at=0"], "train.stop_at=0"),
    (["train.grad_accum=0"], "train.grad_accum=0"),
    (["train.save_every=-1"], "train.save_every=-1"),
    (["train.keep_last=-1"], "train.keep_last=-1"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["draft_head.slots=0"], "draft_head.slots"),
    (["draft_head.hidden=0"], "draft_head.hidden=0"),
    (["draft_head.max_offset=0"], "draft_head.max_offset=0"),
    (["draft_head.vocab_size=1"], "draft_head.vocab_size"),
    (["draft_head.vocab_batches=0"], "draft_head.vocab_batches=0"),
    (["draft_head.kind=tree"], "draft_head.kind='tree' must be one of chain, one-pass"),
    (["draft_head.kind=one-pass", "draft_head.rank=0"], "draft_head.rank=0"),
    (["draft_head.kind=one-pass", "draft_head.vocab_size=100"], "draft_head.vocab_size (a truncated draft vocabulary) "
                                                                "is for chain heads, not one-pass"),
]

ROPE_SETTINGS = [
    (["model.n_head=3"], "model.d_model=256 must be a multiple of model.n_head=3"),
    (["model.d_model=264", "model.n_head=8"], "model.d_model=264 / model.n_head=8 = 33 (the head width) must be even"),
    (["model.attention_dropout=1.0"], "model.attention_dropout=1.0"),
    (["model.dropout=2"], "model.dropout=2"),
    (["model.n_layer=0"], "model.n_layer=0"),
]


@pytest.mark.parametrize(("config", "overrides", "needle"),
                         [(XLNET_CONFIG, *case) for case in TRAIN_SETTINGS] + [(ROPE_CONFIG, *case)
                                                                                for case in ROPE_SETTINGS])
def test_a_bad_training_setting_is_one_line_before_anything_is_built(config, overrides, needle, tmp_path, capsys,
                                                                     nothing_is_built):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", str(config), f"train.run_dir={run_dir}", *overrides])
    _refused_in_one_line(capsys, code, needle)
    assert not nothing_is_built and not run_dir.exists()


def test_the_shipped_configs_pass_the_checks(capsys, tmp_path, nothing_is_built):
    """The checks refuse only bad values: an unchanged config reaches the trainer."""
    for config in (XLNET_CONFIG, ROPE_CONFIG):
        assert main(["train", "--config", str(config), f"train.run_dir={tmp_path / 'run'}"]) == 1
        assert "built despite a bad setting" in capsys.readouterr().err
    assert len(nothing_is_built) == 2


@pytest.mark.parametrize(("backbone", "settings", "needle"), [
    ("xlnet", dict(d_model=130, n_head=4), "d_model=130 must be a multiple of n_head=4"),
    ("xlnet", dict(n_layer=0), "n_layer=0"),
    ("xlnet", dict(vocab_size=0), "vocab_size=0"),
    ("xlnet", dict(dropout=1.0), "dropout=1.0"),
    ("xlnet", dict(layer_norm_eps=0.0), "layer_norm_eps=0.0"),
    ("xlnet", dict(attn_type="both"), "attn_type='both'"),
    ("xlnet", dict(d_head=16), "d_head=16 must be d_model // n_head = 8"),
    ("rope", dict(d_model=30, n_head=4), "d_model=30 must be a multiple of n_head=4"),
    ("rope", dict(d_model=36, n_head=4), "d_model=36 / n_head=4 = 9 (the head width) must be even"),
    ("rope", dict(rope_theta=-1.0), "rope_theta=-1.0"),
    ("rope", dict(norm_eps=0), "norm_eps=0"),
    ("rope", dict(attention_dropout=-0.5), "attention_dropout=-0.5"),
    ("rope", dict(embedding_scale=float("nan")), "embedding_scale=nan"),
])
def test_a_model_built_in_python_is_checked_first(backbone, settings, needle):
    fields = dict(vocab_size=10, d_model=32, n_layer=1, n_head=4, d_inner=16) | settings
    with pytest.raises(ValueError, match="^" + re.escape(needle)) as info:
        ASARM.from_config(fields, backbone=backbone, init_std=0.02)
    assert "\n" not in str(info.value)


def test_init_std_names_the_backbone_setting():
    with pytest.raises(ValueError, match=r"^initializer_range=-1\.0 must be a finite number >= 0"):
        ASARM.from_config(dict(vocab_size=10, d_model=8, n_layer=1, n_head=2, d_inner=8), init_std=-1.0)


SAMPLE_OPTIONS = [
    (["--k", "0"], "--k must be an integer >= 1, got 0"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--r-atol", "-1"], "--r-atol must be >= 0"),
    (["--r-atol", "inf"], "--r-atol must be >= 0 and finite, got inf"),
    (["--draft-temperature-ratio", "0"], "--draft-temperature-ratio"),
    (["--adaptive-threshold", "1.5"], "--adaptive-threshold"),
    (["--sampler", "auto", "--cost-profile", "no/such/folder/cost.json"], "--cost-profile no/such/folder/cost.json"),
    (["--masking-rate", "1.5"], "--masking-rate"),
]


@pytest.mark.parametrize(("options", "needle"), SAMPLE_OPTIONS)
def test_a_bad_sampling_option_is_one_line_before_the_model_loads(options, needle, capsys, nothing_is_built):
    code = main(["sample", "--text", "One two three.", *options])
    _refused_in_one_line(capsys, code, needle)
    assert not nothing_is_built


SPECULATIVE_OPTIONS = [
    (["--k", "0"], "--k must be an integer >= 1, got 0"),
    (["--temperature", "-1"], "--temperature"),
    (["--draft-temperature-ratio", "inf"], "--draft-temperature-ratio"),
    (["--samplers", "assd-fused-adaptive", "--adaptive-threshold", "-0.1"], "--adaptive-threshold"),
    (["--samplers", "assd-auto", "--cost-profile", "no/such/folder/cost.json"], "--cost-profile"),
    (["--start-fraction", "1.0"], "--start-fraction"),
    (["--length", "1"], "--length"),
    (["--batch-size", "0"], "--batch-size"),
    (["--trials", "0"], "--trials"),
]


@pytest.mark.parametrize(("options", "needle"), SPECULATIVE_OPTIONS)
def test_a_bad_benchmark_option_is_one_line_before_the_model_loads(options, needle, tmp_path, capsys,
                                                                   nothing_is_built):
    code = main(["eval", "speculative", "--out", str(tmp_path / "out"), "--ppl-model", "none", *options])
    _refused_in_one_line(capsys, code, needle)
    assert not nothing_is_built and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("settings", "setting"), [
    (dict(r_atol=True), "r_atol"),
    (dict(r_atol=float("inf")), "r_atol"),
    (dict(bonus="yes"), "bonus"),
    (dict(fused=1), "fused"),
    (dict(fused=True, outcomes=0), "outcomes"),
    (dict(k=2.0), "k"),
    (dict(draft_length=float("nan")), "draft_length"),
    (dict(draft_temperature_ratio=0.0), "draft_temperature_ratio"),
])
def test_sampler_spec_settings_are_checked_by_name(settings, setting):
    with pytest.raises(SettingError) as info:
        SamplerSpec(**settings).resolve()
    assert info.value.setting == setting
