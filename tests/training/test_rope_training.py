"""The rotary backbone through the trainer: its configs, exact resume, bf16 autocast, and the backbone rules."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_trainer import REPO, tiny_overrides, tokenizer_dir, train_losses  # noqa: F401

from asarm.model import ASARM
from asarm.sampling import assd_decode
from asarm.training.config import load_config
from asarm.training.trainer import latest_checkpoint, run_training

ROPE = {"model.backbone": "rope", "model.d_inner": 48}


def rope_config(run_dir, small_text, tokenizer_dir, **extra):  # noqa: F811
    """configs/tiny_cpu_rope.yaml at test size (the tiny overrides of the trainer tests)."""
    return load_config(REPO / "configs" / "tiny_cpu_rope.yaml",
                       tiny_overrides(run_dir, small_text, tokenizer_dir, **{**ROPE, **extra}))


def test_tiny_rope_config_trains_resumes_exactly_and_samples(tmp_path, small_text, tokenizer_dir):  # noqa: F811
    steps = {"train.max_steps": 4, "model.attention_dropout": 0.05}
    full = run_training(rope_config(tmp_path / "full", small_text, tokenizer_dir, **steps))
    run_training(rope_config(tmp_path / "split", small_text, tokenizer_dir, **{**steps, "train.stop_at": 2}))
    resumed = run_training(rope_config(tmp_path / "split", small_text, tokenizer_dir, **steps))
    assert sorted(resumed["losses"]) == [3, 4]
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "full") == full["losses"]
    a, b = (ASARM.from_pretrained(latest_checkpoint(tmp_path / run) / "model", device="cpu")
            for run in ("full", "split"))
    assert a.backbone.name == b.backbone.name == "rope" and a.config.d_inner == 48
    assert a.config.attention_dropout == 0.05  # model.attention_dropout reaches the backbone
    for (name, pa), (_, pb) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert torch.equal(pa, pb), name
    # the checkpoint samples (ASSD, cached engine) without a word of backbone-specific code in the sampler
    tokens = a.tokenizer("The game was played in the autumn of that year", return_tensors="pt")["input_ids"]
    sigma = torch.arange(tokens.shape[1])[None]
    out = assd_decode(a, tokens, sigma, torch.tensor([3]), k=3, seed=0)
    assert out.exact and int(out.nfe[0]) <= tokens.shape[1] - 3
    saved = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())
    assert saved["model"]["backbone"] == "rope"


def _cpu_has_bf16() -> bool:
    try:
        torch.ones(4, 4, dtype=torch.bfloat16) @ torch.ones(4, 4, dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one state per process (its mixed precision included): reset it around a bf16 run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.skipif(not _cpu_has_bf16(), reason="this CPU has no bfloat16 matmul")
def test_bf16_autocast_trains_the_rope_backbone(tmp_path, small_text, tokenizer_dir,  # noqa: F811
                                                fresh_accelerate_state):
    """train.mixed_precision=bf16 runs the forward under bf16 autocast (the losses differ from float32's, within
    bf16 rounding) and keeps float32 master weights."""
    from accelerate.state import AcceleratorState

    steps = {"train.max_steps": 2, "train.grad_accum": 1}
    fp32 = run_training(rope_config(tmp_path / "fp32", small_text, tokenizer_dir, **steps))
    AcceleratorState._reset_state(reset_partial_state=True)
    bf16 = run_training(rope_config(tmp_path / "bf16", small_text, tokenizer_dir,
                                    **{**steps, "train.mixed_precision": "bf16"}))
    for step in (1, 2):
        assert fp32["losses"][step] != bf16["losses"][step]
        assert abs(fp32["losses"][step] - bf16["losses"][step]) < 0.05 * fp32["losses"][step]
    model = ASARM.from_pretrained(latest_checkpoint(tmp_path / "bf16") / "model", device="cpu")
    assert model.dtype == torch.float32


def test_backbone_option_must_match_the_initial_checkpoint(tmp_path, small_text, tokenizer_dir,  # noqa: F811
                                                           tiny_model_dir):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", small_text, tokenizer_dir,
                                           **{"model.init": str(tiny_model_dir), "model.backbone": "rope"}))
    with pytest.raises(ValueError, match="model.backbone is 'rope' but model.init .* is a 'xlnet' model"):
        run_training(cfg)
    with pytest.raises(ValueError, match="model.backbone must be one of rope, xlnet"):
        load_config(None, ["model.backbone=gpt"])
    with pytest.raises(ValueError, match="model.attention_dropout is an option of model.backbone: rope"):
        load_config(None, ["model.attention_dropout=0.1"])


@pytest.mark.parametrize("name", ["tiny_cpu_rope", "rope_base_owt"])
def test_rope_configs_select_the_backbone_at_equal_size(name):
    """The shipped rope configs have the parameter count of their XLNet counterparts (within 1%)."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.model.backbone == "rope"
    sizes = dict(d_model=cfg.model.d_model, n_layer=cfg.model.n_layer, n_head=cfg.model.n_head, vocab_size=6000)
    xlnet_inner = {"tiny_cpu_rope": 1024, "rope_base_owt": 3072}[name]
    with torch.device("meta"):
        rope = ASARM.from_config(backbone="rope", d_inner=cfg.model.d_inner, device="meta", **sizes)
        xlnet = ASARM.from_config(d_inner=xlnet_inner, device="meta", **sizes)
    count = [sum(p.numel() for p in m.backbone.parameters()) for m in (rope, xlnet)]
    assert abs(count[0] - count[1]) < 0.01 * count[1], count


def test_fsdp_config_wraps_the_rope_layers():
    """configs/accelerate_fsdp.yaml (multi-GPU; test_fsdp_cpu.py runs it on two CPU processes) names the rope
    backbone's block as the FSDP unit and keeps full-weight checkpoints."""
    from asarm.backbones import rope

    config = yaml.safe_load((REPO / "configs" / "accelerate_fsdp.yaml").read_text())
    fsdp = config["fsdp_config"]
    assert config["distributed_type"] == "FSDP" and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert isinstance(getattr(rope, fsdp["fsdp_transformer_layer_cls_to_wrap"]), type)
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_use_orig_params"] is True
