"""The backbone layer: the registry, loading by config.json's model_type, and the interface every backbone keeps
(training forward, LM head, embedding, cached pass) as the rest of asarm uses it; a backbone written from the
interface alone runs on both engines."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from asarm import masks, orders
from asarm.backbones import BACKBONES, Backbone
from asarm.model import ASARM, ModelLoadError
from asarm.sampling import assd_decode, sequential_decode
from asarm.sampling.cached_engine import CachedEngine
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


# ------------------------------------------------------------------ a backbone written from the interface alone
class OneLayerBackbone(Backbone):
    """What asarm.backbones.base asks for and nothing more (no ``d_head``, no ``check_cached_supported``: the
    interface provides them): one attention layer in which each query row attends to the content rows its position
    may see; a content row's key and value are those of its token embedding plus a learned position embedding."""

    name = "one-layer"
    model_type = "asarm-one-layer-test"

    def __init__(self, vocab_size: int = 16, d_model: int = 8, n_head: int = 2, max_length: int = 16):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, d_model=d_model, n_layer=1, n_head=n_head,
                                      d_head=d_model // n_head)
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_length + 1, d_model)  # position max_length: the cached pass's padding rows
        self.query_start = nn.Parameter(torch.randn(d_model))
        self.q, self.k, self.v = (nn.Linear(d_model, d_model, bias=False) for _ in range(3))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def readout(self):
        return self.embedding.weight, self.bias

    def embed(self, tokens):
        return self.embedding(tokens)

    def heads(self, x):
        return x.reshape(x.shape[0], x.shape[1], self.config.n_head, self.d_head)  # (b, n, H, d_head)

    def attend(self, query_positions, keys, values, hidden):
        """Query rows at ``query_positions (b, k)`` over ``keys``/``values (b, H, K, d_head)``; ``hidden (b, 1, k,
        K)``: True where a row may not look."""
        rows = self.query_start + self.position(query_positions)
        q = self.heads(self.q(rows)).transpose(1, 2)
        scores = (q @ keys.transpose(-1, -2) / self.d_head ** 0.5).masked_fill(hidden, float("-inf"))
        return rows + (torch.softmax(scores, -1) @ values).transpose(1, 2).reshape(rows.shape)

    def content_keys_and_values(self, tokens, positions):
        content = self.embed(tokens) + self.position(positions)
        return self.heads(self.k(content)), self.heads(self.v(content))

    def query_states(self, input_ids, perm_mask, target_mapping):
        length = input_ids.shape[1]
        keys, values = self.content_keys_and_values(input_ids, torch.arange(length).expand_as(input_ids))
        query_positions = target_mapping.argmax(-1)
        hidden = perm_mask.bool().gather(1, query_positions[:, :, None].expand(-1, -1, length))[:, None]
        return self.attend(query_positions, keys.transpose(1, 2), values.transpose(1, 2), hidden)


class CachedOneLayerBackbone(OneLayerBackbone):
    """The same network with the cached pass: content keys and values go into the rank cache, the query rows read
    it."""

    def cache_context(self, seq_len: int):
        return None  # no positional table depends on the length

    def cached_pass(self, cache, context, layout, content_tokens):
        n_content = content_tokens.shape[1]
        keys, values = self.content_keys_and_values(content_tokens, layout.row_positions[:, :n_content])
        cache.write(0, layout.slots, layout.content_ranks, keys, values)
        keys, values = cache.read(0, layout.n_keys, layout.read_slots)
        return self.attend(layout.row_positions[:, n_content:], keys, values, layout.hidden[:, :, n_content:])


def one_layer_model(kind: type[OneLayerBackbone]) -> ASARM:
    torch.manual_seed(0)
    return ASARM(kind().double(), mask_token_id=6)


def test_a_backbone_without_a_cached_pass_is_refused_by_the_cached_engine():
    with pytest.raises(NotImplementedError, match="the one-layer backbone has no cached pass; use engine='full'"):
        CachedEngine(one_layer_model(OneLayerBackbone))


@pytest.mark.parametrize("decode", [sequential_decode, lambda *args, **kwargs: assd_decode(*args, k=3, **kwargs)],
                         ids=["sequential", "assd"])
def test_a_backbone_written_from_the_interface_runs_on_both_engines(decode):
    model = one_layer_model(CachedOneLayerBackbone)
    gen = torch.Generator().manual_seed(3)
    n_prompt = torch.tensor([1, 4, 7])
    tokens = torch.randint(7, 16, (3, 12), generator=gen)
    sigma = orders.any_subset(n_prompt, 12, generator=gen)
    full, cached = (decode(model, tokens, sigma, n_prompt, seed=5, engine=engine) for engine in ("full", "cached"))
    assert torch.equal(full.tokens, cached.tokens) and torch.equal(full.nfe, cached.nfe)
    assert (full.tokens != 6).all()  # every position decoded
