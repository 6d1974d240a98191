"""The backbone layer: the registry, loading by config.json's model_type, and the interface every backbone keeps
(training forward, LM head, embedding, cached pass) as the rest of asarm uses it."""

from __future__ import annotations

import json

import pytest
import torch

from asarm import masks, orders
from asarm.backbones import BACKBONES, Backbone
from asarm.model import ASARM, ModelLoadError
from asarm.training.objectives import ObjectiveConfig, compute_loss

SIZES = dict(vocab_size=30, d_model=32, n_layer=2, n_head=4, d_inner=48)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_save_and_load_pick_the_backbone_from_the_config(tmp_path, name):
    model = ASARM.from_config(backbone=name, seed=0, device="cpu", **SIZES)
    assert isinstance(model.backbone, Backbone) and model.backbone.name == name
    model.save_pretrained(tmp_path / name)
    assert json.loads((tmp_path / name / "config.json").read_text())["model_type"] == BACKBONES[name].model_type
    loaded = ASARM.from_pretrained(tmp_path / name, device="cpu")
    assert type(loaded.backbone) is BACKBONES[name]
    tokens = torch.randint(7, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    sigma = orders.any_subset(torch.tensor([3, 4]), 10, generator=torch.Generator().manual_seed(1))
    query = torch.argsort(sigma, 1)[:, 4:7]
    args = (tokens, sigma, torch.tensor([3, 4]), query)
    assert torch.equal(loaded.logits(*args), model.logits(*args))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_the_interface_pieces_agree(name):
    """forward = lm_head(query_states) = the readout's affine map; embed is the LM head's tied matrix."""
    backbone = ASARM.from_config(backbone=name, seed=2, device="cpu", **SIZES).backbone
    tokens = torch.randint(7, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    sigma = orders.any_permutation(torch.tensor([2, 3]), 9, generator=torch.Generator().manual_seed(1))
    pm = masks.perm_mask(sigma, torch.tensor([2, 3]))
    tm = masks.target_mapping(torch.argsort(sigma, 1)[:, 3:5], 9)
    states = backbone.query_states(tokens, pm, tm)
    weight, bias = backbone.readout()
    torch.testing.assert_close(backbone(tokens, pm, tm), states @ weight.t() + bias)
    torch.testing.assert_close(backbone.lm_head(states), states @ weight.t() + bias)
    assert torch.equal(backbone.embed(tokens), weight[tokens])  # tied embeddings
    assert states.shape == (2, 2, backbone.d_model) and backbone.d_head * SIZES["n_head"] == SIZES["d_model"]


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("objective", [{"objective": "joint"},
                                       {"objective": "parallel", "prompt_attn": "prompt_only"},
                                       {"mixture": {"joint": 0.5, "parallel": 0.5}}])
def test_every_objective_trains_every_backbone(name, objective):
    model = ASARM.from_config(backbone=name, seed=0, device="cpu", **SIZES)
    model.backbone.train()
    tokens = torch.randint(7, 30, (4, 12), generator=torch.Generator().manual_seed(0))
    loss, stats = compute_loss(model, tokens, ObjectiveConfig(**objective), torch.Generator().manual_seed(1))
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_lemma_1_on_the_rope_backbone():
    """The parallel objective's first target is scored exactly like the oracle conditional (same visibility)."""
    model = ASARM.from_config(backbone="rope", seed=0, device="cpu", **SIZES)
    tokens = torch.randint(7, 30, (4, 16), generator=torch.Generator().manual_seed(7))
    cfg = ObjectiveConfig(objective="parallel", prompt_attn="prompt_only", reduction="sum")
    _, stats = compute_loss(model, tokens, cfg, torch.Generator().manual_seed(4), rates=0.5)
    batch = stats["batch"]
    logits = model.backbone(tokens, batch.perm_mask, batch.target_mapping)
    oracle = model.log_probs(tokens, batch.sigma, batch.n_prompt, batch.query_positions[:, :1])
    torch.testing.assert_close(model.normalize(logits[:, :1]), oracle, rtol=0, atol=1e-5)


def test_unknown_backbones_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'gpt'; choose one of rope, xlnet"):
        ASARM.from_config(backbone="gpt", **SIZES)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2', which no asarm backbone reads"):
        ASARM.from_pretrained(tmp_path / "m")
