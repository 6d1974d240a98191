"""The rope backbone (asarm.backbones.rope): its forward against a slow explicit reference, its invariances, the
cached pass against the full forward, gradients and dtypes, saving and loading, the parameter count."""

import json
import math

import pytest
import torch

from asarm.backbones.kv_cache import RankCache, pass_layout
from asarm.backbones.rope import RopeBackbone, RopeConfig, apply_rotary, rotary_table
from asarm.masks import perm_mask, target_mapping
from asarm.model import ASARM
from asarm.orders import any_permutation, any_subset

TINY = {"vocab_size": 50, "d_model": 32, "n_layer": 2, "n_head": 4, "d_inner": 48}
L = 12


def tiny(dtype=torch.float64, **fields) -> RopeBackbone:
    model = ASARM.from_config(backbone="rope", seed=0, device="cpu", **{**TINY, **fields}).backbone.to(dtype).eval()
    with torch.no_grad():  # the head bias and norms start trivial: make them matter to the comparisons
        for name, param in model.named_parameters():
            if name == "lm_bias" or "norm" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def batch(n_prompt, order=any_permutation, seed=0, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    n_prompt = torch.tensor(n_prompt)
    sigma = order(n_prompt, L, generator=gen)
    tokens = torch.randint(0, vocab, (len(n_prompt), L), generator=gen)
    return tokens, sigma, n_prompt


# ------------------------------------------------------------------------------------------------ reference
def rope_reference(x, positions, theta):
    """Rotary as complex multiplication: coordinate i and i + d/2 are one complex number turned by pos * w_i."""
    half = x.shape[-1] // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones(()).double(), positions[:, None] * freq)
    return torch.cat([z.real, z.imag], dim=-1)


def rms_reference(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def attention_reference(q, k, v, sees):
    """Per head softmax with -inf masking; a row that sees nothing gives zeros."""
    scores = torch.einsum("qd,kd->qk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~sees, float("-inf"))
    prob = torch.exp(scores - scores.amax(-1, keepdim=True))
    prob = prob / prob.sum(-1, keepdim=True)
    return torch.where(sees.any(-1, keepdim=True), prob, 0.0) @ v


def reference_states(model, tokens, pm, tm):
    """Two streams, one batch row, one layer and one head at a time."""
    cfg, P = model.config, dict(model.named_parameters())
    H, dh, eps = cfg.n_head, cfg.d_head, cfg.norm_eps
    out = []
    for b in range(tokens.shape[0]):
        q_pos = tm[b].argmax(-1)
        sees_h = (pm[b] == 0) | torch.eye(L, dtype=torch.bool)
        sees_g = pm[b][q_pos] == 0
        h, g = P["embedding.weight"][tokens[b]] * cfg.embedding_scale, P["mask_embedding"].expand(len(q_pos), -1)
        for layer in range(cfg.n_layer):
            W = {name[len(f"layers.{layer}."):]: p for name, p in P.items() if name.startswith(f"layers.{layer}.")}
            a, c = rms_reference(h, W["norm_attn.weight"], eps), rms_reference(g, W["norm_attn.weight"], eps)
            heads_h, heads_g = [], []
            for i in range(H):
                cols = slice(i * dh, (i + 1) * dh)
                w_k, w_v = W["kv.weight"].chunk(2)  # keys and values are one matrix
                k = rope_reference(a @ w_k[cols].T, torch.arange(L), cfg.rope_theta)
                v = a @ w_v[cols].T
                qh = rope_reference(a @ W["q.weight"][cols].T, torch.arange(L), cfg.rope_theta)
                qg = rope_reference(c @ W["q.weight"][cols].T, q_pos, cfg.rope_theta)
                heads_h.append(attention_reference(qh, k, v, sees_h))
                heads_g.append(attention_reference(qg, k, v, sees_g))
            h = h + torch.cat(heads_h, -1) @ W["o.weight"].T
            g = g + torch.cat(heads_g, -1) @ W["o.weight"].T
            h, g = (s + mlp_reference(rms_reference(s, W["norm_mlp.weight"], eps), W) for s in (h, g))
        out.append(rms_reference(g, P["norm_out.weight"], eps))
    return torch.stack(out)


def mlp_reference(x, W):
    w_gate, w_up = W["mlp.gate_up.weight"].chunk(2)  # one matrix, gate rows first
    gate = x @ w_gate.T
    return (gate * torch.sigmoid(gate) * (x @ w_up.T)) @ W["mlp.down.weight"].T


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("order", [any_permutation, any_subset])
def test_forward_matches_explicit_reference(draft, order):
    model = tiny()
    tokens, sigma, n_prompt = batch([0, 2, 5], order, seed=1)
    n_visible = torch.tensor([4, 2, 7]) if draft else None
    pm = perm_mask(sigma, n_prompt, n_visible, dtype=torch.float64)
    positions = torch.argsort(sigma, 1)
    # row 0 has no prompt: its rank-0 query sees nothing; the last slot is unused
    q_pos = torch.cat([positions[:, [0, 3, 6, 9, 11]], torch.full((3, 1), -1)], 1)
    tm = target_mapping(q_pos, L, dtype=torch.float64)
    with torch.no_grad():
        states = model.query_states(tokens, pm, tm)
        logits = model(tokens, pm, tm)
    expected = reference_states(model, tokens, pm, tm[:, :-1])
    torch.testing.assert_close(states[:, :-1], expected, atol=1e-10, rtol=0)
    weight, bias = model.readout()
    torch.testing.assert_close(logits[:, :-1], expected @ weight.T + bias, atol=1e-10, rtol=0)
    assert states[:, -1].isfinite().all()
    assert not torch.allclose(states[:, 0], states[:, 1])  # the queries differ: the test is not vacuous


def test_query_depends_only_on_what_it_sees():
    """A query on rank r sees the prompt (bidirectional) and ranks n_prompt .. r - 1, rank-causally: reordering the
    prompt and the ranks above r, and changing the tokens above r, changes nothing."""
    model = tiny()
    tokens, sigma, n_prompt = batch([3], seed=2)
    r = 7
    gen = torch.Generator().manual_seed(3)
    shuffle_prompt = torch.randperm(3, generator=gen)
    shuffle_above = r + 1 + torch.randperm(L - r - 1, generator=gen)
    remap = torch.cat([shuffle_prompt, torch.arange(3, r + 1), shuffle_above])
    sigma_b = remap[sigma]
    tokens_b = torch.where(sigma > r, torch.randint(0, 50, (1, L), generator=gen), tokens)
    assert not torch.equal(sigma_b, sigma) and not torch.equal(tokens_b, tokens)
    p = int(torch.argsort(sigma, 1)[0, r])
    tm = target_mapping(torch.tensor([[p]]), L, dtype=torch.float64)
    with torch.no_grad():
        a = model.query_states(tokens, perm_mask(sigma, n_prompt, dtype=torch.float64), tm)
        b = model.query_states(tokens_b, perm_mask(sigma_b, n_prompt, dtype=torch.float64), tm)
        seen = int(torch.argsort(sigma, 1)[0, r - 1])
        tokens_c = tokens.clone()
        tokens_c[0, seen] = (tokens_c[0, seen] + 1) % 50
        c = model.query_states(tokens_c, perm_mask(sigma, n_prompt, dtype=torch.float64), tm)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert (a - c).abs().max() > 1e-6  # a token it sees does matter


def test_query_depends_on_relative_positions_only():
    """Moving the whole visible text by a constant offset (the unseen positions around it ranked last) leaves a
    query's state unchanged: rotary positions are relative."""
    model = tiny()
    gen = torch.Generator().manual_seed(4)
    n, shift = 8, 3
    inner = torch.randperm(n, generator=gen)  # ranks of the 8 real tokens
    words = torch.randint(0, 50, (n,), generator=gen)
    sigma_a = torch.cat([inner, torch.arange(n, L)])[None]
    sigma_b = torch.cat([torch.arange(n, n + shift), inner, torch.arange(n + shift, L)])[None]
    filler = torch.ones(L, dtype=torch.long)  # tokens nobody sees
    tokens_a = torch.cat([words, filler[:L - n]])[None]
    tokens_b = torch.cat([filler[:shift], words, filler[:L - n - shift]])[None]
    n_prompt = torch.tensor([2])
    q = torch.tensor([[int(inner.argmax()), int((inner == 4).nonzero())]])
    with torch.no_grad():
        a = model.query_states(tokens_a, perm_mask(sigma_a, n_prompt, dtype=torch.float64),
                               target_mapping(q, L, dtype=torch.float64))
        b = model.query_states(tokens_b, perm_mask(sigma_b, n_prompt, dtype=torch.float64),
                               target_mapping(q + shift, L, dtype=torch.float64))
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------ rotary
def test_rotary_matches_complex_form_and_is_relative():
    gen = torch.Generator().manual_seed(5)
    d, theta = 16, 10000.0
    q, k = torch.randn(2, 20, d, dtype=torch.float64, generator=gen)
    pos_q, pos_k = torch.randint(0, 40, (2, 20), generator=gen)
    cos, sin = rotary_table(100, d, theta, torch.float64)
    assert cos.shape == sin.shape == (100, d)

    def turn(x, pos):
        return apply_rotary(x, cos[pos], sin[pos])

    torch.testing.assert_close(turn(q, pos_q), rope_reference(q, pos_q, theta), atol=1e-12, rtol=0)
    score = (turn(q, pos_q) * turn(k, pos_k)).sum(-1)
    for shift in (1, 7, 55):
        shifted = (turn(q, pos_q + shift) * turn(k, pos_k + shift)).sum(-1)
        torch.testing.assert_close(shifted, score, atol=1e-12, rtol=0)
    assert (score - (q * k).sum(-1)).abs().max() > 1e-3  # it does turn


def test_rotary_tables_are_at_least_float32():
    cos, sin = rotary_table(5, 8, 10000.0, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.float32
    x = torch.randn(5, 8).to(torch.bfloat16)
    assert apply_rotary(x, cos, sin).dtype == torch.bfloat16
    assert rotary_table(5, 8, 10000.0, torch.float64)[0].dtype == torch.float64


# ------------------------------------------------------------------------------------------------ cached pass
def content_rows(tokens, positions, start, end):
    """Content rows of ranks ``start .. end - 1`` per row, padded with rank L; and their tokens."""
    count = end - start
    t = torch.arange(max(int(count.max()), 1))
    ranks = torch.where(t < count[:, None], start[:, None] + t, L)
    return ranks, tokens.gather(1, positions.gather(1, ranks.clamp(max=L - 1)))


def full_states(model, tokens, sigma, n_prompt, q_rank, q_limit):
    """The full forward's state of each query (rank, limit): the draft mask with n_visible = limit."""
    positions = torch.argsort(sigma, 1)
    out = []
    for t in range(q_rank.shape[1]):
        pm = perm_mask(sigma, n_prompt, q_limit[:, t], dtype=torch.float64)
        tm = target_mapping(positions.gather(1, q_rank[:, t:t + 1]), L, dtype=torch.float64)
        out.append(model.query_states(tokens, pm, tm))
    return torch.cat(out, 1)


@torch.no_grad()
def test_cached_pass_matches_full_forward():
    model = tiny()
    model.check_cached_supported()
    tokens, sigma, n_prompt = batch([3, 1, 5], seed=6)
    positions = torch.argsort(sigma, 1)
    cfg = model.config
    cache = RankCache(cfg.n_layer, 3, cfg.n_head, L, model.d_head, torch.float64, "cpu")
    context = model.cache_context(L)
    assert context[0].shape == (L + 1, model.d_head) and model.cache_context(L) is context
    slots = torch.arange(3)

    # pass 1: content rows only (rows 0 and 2 just their prompt, then padding rows)
    c_rank, c_tok = content_rows(tokens, positions, torch.zeros(3, dtype=torch.long), torch.tensor([3, 6, 5]))
    assert (c_rank == L).any()
    layout = pass_layout(slots, 3, positions, n_prompt, c_rank)
    assert model.cached_pass(cache, context, layout, c_tok).shape == (3, 0, cfg.d_model)

    # pass 2: more content rows (row 1: padding only) and query rows, oracle (limit = rank) and draft
    c_rank, c_tok = content_rows(tokens, positions, torch.tensor([3, 6, 5]), torch.tensor([8, 6, 9]))
    q_rank = torch.tensor([[8, 5, 10, 9], [6, 1, 11, 3], [9, 7, 5, 11]])
    q_limit = torch.tensor([[8, 5, 8, 4], [6, 1, 2, 3], [9, 6, 5, 9]])
    layout = pass_layout(slots, 3, positions, n_prompt, c_rank, q_rank, q_limit)
    cached = model.cached_pass(cache, context, layout, c_tok)
    assert cached.shape == (3, 4, cfg.d_model)
    torch.testing.assert_close(cached, full_states(model, tokens, sigma, n_prompt, q_rank, q_limit),
                               atol=1e-10, rtol=0)

    # pass 3: queries only, on a subset of the slots in another order (the cache is gathered)
    rows = torch.tensor([2, 0])
    q_rank, q_limit = torch.tensor([[10, 8], [11, 3]]), torch.tensor([[9, 7], [8, 3]])
    layout = pass_layout(rows, 3, positions[rows], n_prompt[rows], torch.zeros(2, 0, dtype=torch.long),
                         q_rank, q_limit)
    assert layout.read_slots is not None
    cached = model.cached_pass(cache, context, layout, torch.zeros(2, 0, dtype=torch.long))
    torch.testing.assert_close(cached, full_states(model, tokens[rows], sigma[rows], n_prompt[rows], q_rank, q_limit),
                               atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------ training
def _loss(model, dtype=torch.float32):
    tokens, sigma, n_prompt = batch([2, 4], seed=7)
    q_pos = torch.argsort(sigma, 1)[:, 4:]
    logits = model(tokens, perm_mask(sigma, n_prompt, dtype=dtype), target_mapping(q_pos, L, dtype=dtype))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.gather(1, q_pos).flatten()), logits


@pytest.mark.parametrize("dropout", [{"dropout": 0.1}, {"attention_dropout": 0.1}])
def test_gradients_reach_every_parameter_and_dropout_trains(dropout):
    model = tiny(torch.float32, **dropout).train()
    loss, logits = _loss(model)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all() and param.grad.abs().sum() > 0, name
    assert not torch.allclose(logits, _loss(model)[1])  # dropout is on in training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_loss(model)[1], _loss(model)[1], atol=0, rtol=0)


def _cpu_bf16() -> bool:
    try:
        x = torch.randn(8, 8).to(torch.bfloat16)
        return bool((x @ x).isfinite().all())
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cpu_bf16(), reason="this CPU build cannot run bfloat16 matmuls")
@torch.no_grad()
def test_bfloat16_autocast_and_weights_are_close_to_float32():
    model = tiny(torch.float32)
    reference = _loss(model)[1]
    scale = reference.abs().max()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = _loss(model)[1]
    half = _loss(model.to(torch.bfloat16))[1]
    assert half.dtype == torch.bfloat16
    for out in (autocast, half):
        assert out.isfinite().all()
        assert (out.float() - reference).abs().max() < 0.05 * scale


# ------------------------------------------------------------------------------------------------ saving
def test_save_and_load_round_trip(tmp_path):
    from safetensors import safe_open

    model = tiny(torch.float32)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {**TINY, "model_type": "asarm-rope", "dropout": 0.0, "attention_dropout": 0.0,
                      "rope_theta": 10000.0, "norm_eps": 1e-6, "initializer_range": 0.02,
                      "embedding_scale": math.sqrt(32)}  # the default, sqrt(d_model), saved as a number
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    assert set(shapes) == set(model.state_dict())
    assert list(shapes.values()).count((50, 32)) == 1  # the tied head is stored once
    loaded = RopeBackbone.from_pretrained(str(tmp_path)).eval()
    assert loaded.readout()[0] is loaded.embedding.weight
    with torch.no_grad():
        assert torch.equal(_loss(loaded)[1], _loss(model)[1])
    assert RopeBackbone.from_pretrained(tmp_path, dtype=torch.float64).lm_bias.dtype == torch.float64
    # a config saved before embedding_scale existed: its model was trained unscaled, so it must not load scaled
    del config["embedding_scale"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match='no embedding_scale.*add "embedding_scale": 1.0'):
        RopeBackbone.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "embedding_scale": 1.0}))
    unscaled = RopeBackbone.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert not torch.allclose(_loss(unscaled)[1], _loss(model)[1])


def test_load_errors(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        RopeBackbone.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps(RopeConfig(**TINY).to_dict()))
    with pytest.raises(OSError, match="model.safetensors"):
        RopeBackbone.from_pretrained(str(tmp_path))
    with pytest.raises(OSError, match="Hub"):
        RopeBackbone.from_pretrained("nobody-here/no-such-model", local_files_only=True)  # no network


def test_config_checks():
    assert RopeConfig.from_dict({"model_type": "asarm-rope", "d_model": 64, "n_head": 4}).d_head == 16
    defaults = RopeConfig()
    assert (defaults.vocab_size, defaults.d_model, defaults.n_layer, defaults.n_head, defaults.d_inner) == \
        (32000, 768, 12, 12, 2304)
    with pytest.raises(ValueError, match="unknown RopeConfig field.*d_ff, n_heads"):
        RopeConfig.from_dict({"n_heads": 2, "d_ff": 8})
    with pytest.raises(ValueError, match="multiple of n_head"):
        RopeConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="unknown"):
        RopeBackbone.from_config({**TINY, "bogus": 1})
    torch.manual_seed(3)
    a = RopeBackbone.from_config(TINY)
    torch.manual_seed(3)
    assert torch.equal(a.embedding.weight, RopeBackbone.from_config(TINY).embedding.weight)
    assert a.lm_bias.abs().sum() == 0 and (a.norm_out.weight == 1).all()
    big = RopeBackbone.from_config({**TINY, "d_model": 256, "n_layer": 8, "d_inner": 512})
    std = {name: float(p.detach().std()) for name, p in big.named_parameters() if p.ndim == 2}
    assert std["embedding.weight"] == pytest.approx(0.02, rel=0.05)
    assert std["layers.7.kv.weight"] == pytest.approx(0.02, rel=0.05)
    for name in ("layers.0.o.weight", "layers.7.mlp.down.weight"):  # residual writers: 0.02 / sqrt(2 n_layer)
        assert std[name] == pytest.approx(0.005, rel=0.05)


@pytest.mark.parametrize("fields", [TINY, {}])
def test_parameter_count_formula(fields):
    """Per layer 4 d^2 (q, k, v, o) + 3 d d_inner (gated MLP) + 2 d (norms); plus the tied embedding, the head
    bias, the mask embedding and the final norm. The default sizes match XLNet-base's parameter count per layer."""
    with torch.device("meta"):
        model = RopeBackbone(RopeConfig(**fields))
    c = model.config
    d = c.d_model
    per_layer = 4 * d * d + 3 * d * c.d_inner + 2 * d
    assert sum(p.numel() for p in model.parameters()) == c.vocab_size * d + c.vocab_size + 2 * d + c.n_layer * per_layer
    if not fields:
        assert per_layer == 13 * d * d + 2 * d  # XLNet-base: q, k, v, o, r (5 d^2) + a 4 d MLP (8 d^2)
