"""Tests of asarm.training.objectives against slow, obviously correct Python-loop references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from asarm import masks
from asarm.model import ASARM
from asarm.training.objectives import ObjectiveConfig, build_objective_batch, compute_loss, loss_from_logits


@pytest.fixture(scope="module")
def tiny():
    return ASARM.from_config(vocab_size=16, d_model=32, n_layer=2, n_head=4, d_inner=64, seed=0)


def random_tokens(batch_size, seq_len, seed=0, low=7, high=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch_size, seq_len), generator=g)


# ----------------------------------------------------------------------------- references
def reference_perm_mask(ranks, n_prompt, n_visible, bidirectional):
    """perm_mask[i][j] = 1 iff position i may NOT see j, written out from the spec's words.

    Joint (n_visible None): i sees j iff rank(j) < rank(i), or both are prompt positions.
    Parallel: a target (rank >= n_visible) sees exactly the ranks < n_visible; a visible position
    sees lower ranks, and every pair inside the bidirectional block (ranks < bidirectional) is open.
    """
    L = len(ranks)
    out = [[1] * L for _ in range(L)]
    for i in range(L):
        for j in range(L):
            ri, rj = ranks[i], ranks[j]
            if n_visible is None:
                sees = rj < ri or (ri < n_prompt and rj < n_prompt)
            elif ri >= n_visible:
                sees = rj < n_visible
            else:
                sees = rj < ri or (ri < bidirectional and rj < bidirectional)
            out[i][j] = 0 if sees else 1
    return out


def check_row(batch, b, tokens, cfg, rate):
    L = tokens.shape[1]
    ranks = batch.sigma[b].tolist()
    assert sorted(ranks) == list(range(L))
    n_prompt = int(batch.n_prompt[b])
    num_predict = math.floor(L * rate + 1e-9)
    num_predict = min(max(num_predict, 1), L - 1)
    assert int(batch.num_predict[b]) == num_predict
    objective = "parallel" if bool(batch.parallel[b]) else "joint"  # a mixture draws it per row
    if cfg.mixture is None:
        assert objective == cfg.objective
    if objective == "joint":
        assert n_prompt == L - num_predict
        # n_visible = L on the joint rows of a mixed batch: no draft limit, the oracle mask
        assert batch.n_visible is None if not batch.parallel.any() else int(batch.n_visible[b]) == L
        first, n_visible, block = n_prompt, None, n_prompt
    else:
        n_visible = int(batch.n_visible[b])
        assert n_visible == L - num_predict and 1 <= n_prompt <= n_visible
        first = n_visible
        block = {"prompt_only": n_prompt, "prompt_and_decoded": n_visible, "causal": 0}[cfg.prompt_attn]
    if cfg.order == "any_subset":
        # 2^N: every non-prompt position is decoded left to right by position
        rest = [pos for pos in range(L) if ranks[pos] >= n_prompt]
        assert [ranks[pos] for pos in rest] == list(range(n_prompt, L))
    want = reference_perm_mask(ranks, n_prompt, n_visible, block)
    assert batch.perm_mask[b].tolist() == want
    # targets: ranks first .. L-1 in rank order, then padding rows with weight 0
    K = batch.targets.shape[1]
    for t in range(K):
        if t < num_predict:
            pos = ranks.index(first + t)
            assert batch.valid[b, t]
            assert int(batch.query_positions[b, t]) == pos
            assert int(batch.targets[b, t]) == int(tokens[b, pos])
            row = [0.0] * L
            row[pos] = 1.0
            assert batch.target_mapping[b, t].tolist() == row
            scale = {"none": 1.0, "masking_rate": rate, "snr": rate / (1 - rate)}[cfg.loss_scale]
            if objective == "parallel" and cfg.slot_weights:  # draft slot t; past the list: the last weight
                scale *= cfg.slot_weights[min(t, len(cfg.slot_weights) - 1)]
            assert float(batch.weights[b, t]) == pytest.approx(scale, rel=1e-6)
        else:  # an unused slot: no query at all (a repeated position would corrupt XLNet's query stream)
            assert not batch.valid[b, t] and float(batch.weights[b, t]) == 0.0
            assert int(batch.query_positions[b, t]) == -1
            assert batch.target_mapping[b, t].abs().sum() == 0


CASES = list(itertools.product(["joint", "parallel"], ["any_subset", "any_permutation"],
                               ["prompt_only", "prompt_and_decoded", "causal"], [True, False]))
CASES = [c for c in CASES if c[0] == "parallel" or c[2] == "prompt_only"]


@pytest.mark.parametrize("objective,order,prompt_attn,per_sequence", CASES)
def test_masks_and_targets_match_reference(objective, order, prompt_attn, per_sequence):
    L, B = 13, 4
    tokens = random_tokens(B, L, seed=1)
    for seed, scale in zip(range(3), ["none", "masking_rate", "snr"]):
        cfg = ObjectiveConfig(objective=objective, order=order, prompt_attn=prompt_attn, per_sequence=per_sequence,
                              loss_scale=scale)
        rates = torch.tensor([0.2, 0.5, 0.77, 0.99])
        batch = build_objective_batch(tokens, cfg, torch.Generator().manual_seed(seed), rates=rates)
        assert batch.perm_mask.shape == (B, L, L)
        K = batch.targets.shape[1]
        assert batch.target_mapping.shape == (B, K, L) and batch.weights.shape == (B, K)
        for b in range(B):
            check_row(batch, b, tokens, cfg, rates[b].item() if per_sequence else rates[0].item())
        if not per_sequence:
            assert (batch.sigma == batch.sigma[0]).all() and (batch.n_prompt == batch.n_prompt[0]).all()


def test_drawn_rates_orders_and_prompts_vary_per_sequence():
    tokens = random_tokens(64, 20)
    cfg = ObjectiveConfig(objective="parallel", min_masking_rate=0.3, max_masking_rate=0.9)
    batch = build_objective_batch(tokens, cfg, torch.Generator().manual_seed(0))
    assert ((batch.rates >= 0.3) & (batch.rates <= 0.9)).all()
    assert len(set(batch.rates.tolist())) == 64
    assert len({tuple(s) for s in batch.sigma.tolist()}) > 40  # small 2^N prompts can repeat
    assert len(set(batch.n_prompt.tolist())) > 3
    for b in range(64):
        check_row(batch, b, tokens, cfg, batch.rates[b].item())
    again = build_objective_batch(tokens, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(again.sigma, batch.sigma) and torch.equal(again.perm_mask, batch.perm_mask)


def test_prompt_only_is_the_inference_draft_mask():
    tokens = random_tokens(5, 16)
    cfg = ObjectiveConfig(objective="parallel", prompt_attn="prompt_only")
    batch = build_objective_batch(tokens, cfg, torch.Generator().manual_seed(3), rates=0.6)
    draft = masks.draft_perm_mask(batch.sigma, batch.n_prompt, batch.n_visible)
    assert torch.equal(batch.perm_mask, draft)
    joint = build_objective_batch(tokens, ObjectiveConfig(), torch.Generator().manual_seed(3), rates=0.6)
    assert torch.equal(joint.perm_mask, masks.oracle_perm_mask(joint.sigma, joint.n_prompt))


@pytest.mark.parametrize("order", ["any_subset", "any_permutation"])
def test_joint_sum_loss_is_minus_score(tiny, order):
    tokens = random_tokens(5, 24, seed=4)
    cfg = ObjectiveConfig(objective="joint", order=order, reduction="sum")
    rates = torch.tensor([0.1, 0.4, 0.75, 0.9, 0.99])
    loss, stats = compute_loss(tiny, tokens, cfg, torch.Generator().manual_seed(0), rates=rates)
    batch = stats["batch"]
    score = tiny.score(tokens, batch.sigma, batch.n_prompt)
    torch.testing.assert_close(stats["nll_per_sequence"].double(), -score, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss.double() * tokens.shape[0], -score.sum(), rtol=0, atol=1e-5)
    assert int(stats["num_targets"]) == int(batch.num_predict.sum())
    # unused query slots of short rows change nothing: each row alone gives the same value
    for b in range(tokens.shape[0]):
        alone = tiny.score(tokens[b:b + 1], batch.sigma[b:b + 1], batch.n_prompt[b:b + 1])
        torch.testing.assert_close(stats["nll_per_sequence"][b:b + 1].double(), -alone, rtol=0, atol=1e-5)


def test_reductions_and_scales(tiny):
    tokens = random_tokens(3, 20, seed=5)
    rates = torch.tensor([0.3, 0.6, 0.95])
    base = ObjectiveConfig(reduction="sum")
    _, stats = compute_loss(tiny, tokens, base, torch.Generator().manual_seed(1), rates=rates)
    nll = stats["nll_per_sequence"]
    count = stats["batch"].num_predict.sum()
    for scale, factor in [("none", torch.ones(3)), ("masking_rate", rates), ("snr", rates / (1 - rates))]:
        for reduction in ("sum", "mean"):
            cfg = ObjectiveConfig(reduction=reduction, loss_scale=scale)
            loss, _ = compute_loss(tiny, tokens, cfg, torch.Generator().manual_seed(1), rates=rates)
            weighted = (nll * factor.float()).sum()
            want = weighted / 3 if reduction == "sum" else weighted / count
            torch.testing.assert_close(loss.detach(), want.float(), rtol=1e-5, atol=1e-6)


def test_mean_loss_without_mask_exclusion_equals_hf_loss(tiny):
    # with one shared rate there is no padding, so HF's own label loss is the per-token mean
    tokens = random_tokens(3, 18, seed=6)
    cfg = ObjectiveConfig(reduction="mean", exclude_mask_logit=False, per_sequence=False)
    batch = build_objective_batch(tokens, cfg, torch.Generator().manual_seed(2), rates=0.5)
    out = tiny.backbone.hf(input_ids=tokens, perm_mask=batch.perm_mask, target_mapping=batch.target_mapping,
                           labels=batch.targets, use_mems=False)
    loss, _ = loss_from_logits(out.logits, batch, cfg)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)


def test_first_parallel_target_is_the_oracle_conditional(tiny):
    # Lemma 1: the draft of the first undecoded rank equals the oracle conditional
    tokens = random_tokens(4, 16, seed=7)
    cfg = ObjectiveConfig(objective="parallel", prompt_attn="prompt_only", reduction="sum")
    _, stats = compute_loss(tiny, tokens, cfg, torch.Generator().manual_seed(4), rates=0.5)
    batch = stats["batch"]
    logits = tiny.backbone(input_ids=tokens, perm_mask=batch.perm_mask, target_mapping=batch.target_mapping)
    oracle = tiny.log_probs(tokens, batch.sigma, batch.n_prompt, batch.query_positions[:, :1])
    torch.testing.assert_close(tiny.normalize(logits[:, :1]), oracle, rtol=0, atol=1e-5)


def test_backward_and_mask_target_guard(tiny):
    tokens = random_tokens(2, 12, seed=8)
    tiny.backbone.train()
    try:
        loss, stats = compute_loss(tiny, tokens, ObjectiveConfig(), torch.Generator().manual_seed(0))
        loss.backward()
        grads = [p.grad for p in tiny.backbone.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    finally:
        tiny.backbone.zero_grad(set_to_none=True)
        tiny.backbone.eval()
    with_mask = tokens.clone()
    with_mask[:, :] = 6
    with pytest.raises(ValueError, match="<mask>"):
        compute_loss(tiny, with_mask, ObjectiveConfig(), torch.Generator().manual_seed(0))
    # a bare backbone works too (mask id from the config's default)
    loss2, _ = compute_loss(tiny.backbone, tokens, ObjectiveConfig(), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss2)


def test_config_validation():
    with pytest.raises(ValueError, match="objective"):
        ObjectiveConfig(objective="mlm")
    with pytest.raises(ValueError, match="prompt_attn"):
        ObjectiveConfig(prompt_attn="full")
    with pytest.raises(ValueError, match="min_prompt"):
        ObjectiveConfig(min_prompt=0)
    with pytest.raises(ValueError, match="masking rates"):
        build_objective_batch(random_tokens(2, 8), ObjectiveConfig(), rates=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="entries"):
        build_objective_batch(random_tokens(2, 8), ObjectiveConfig(), rates=torch.tensor([0.5, 0.6, 0.7]))


# ----------------------------------------------------------------------------- mixture and slot weights
def batch_fields(batch):
    return {name: getattr(batch, name) for name in ("perm_mask", "target_mapping", "targets", "weights", "valid",
                                                    "query_positions", "sigma", "n_prompt", "n_visible",
                                                    "num_predict", "rates", "scale", "parallel")}


def assert_same_batch(a, b):
    for name, value in batch_fields(a).items():
        other = getattr(b, name)
        assert (value is None and other is None) or torch.equal(value, other), name


@pytest.mark.parametrize("order,prompt_attn,per_sequence",
                         list(itertools.product(["any_subset", "any_permutation"],
                                                ["prompt_only", "prompt_and_decoded", "causal"], [True, False])))
def test_mixture_masks_and_targets_match_reference(order, prompt_attn, per_sequence):
    L, B = 13, 16
    tokens = random_tokens(B, L, seed=2)
    rates = torch.tensor([0.2, 0.5, 0.77, 0.99] * 4)
    seen = set()
    for seed, scale in zip(range(4), ["none", "masking_rate", "snr", "none"]):
        cfg = ObjectiveConfig(mixture={"joint": 0.5, "parallel": 0.5}, order=order, prompt_attn=prompt_attn,
                              per_sequence=per_sequence, loss_scale=scale, slot_weights=(3.0, 2.0, 0.5))
        batch = build_objective_batch(tokens, cfg, torch.Generator().manual_seed(seed), rates=rates)
        for b in range(B):
            check_row(batch, b, tokens, cfg, rates[b].item() if per_sequence else rates[0].item())
        seen.update(batch.parallel.tolist())
        if not per_sequence:  # one objective for the micro-batch, like its rate and order
            assert (batch.parallel == batch.parallel[0]).all()
    assert seen == {True, False}


@pytest.mark.parametrize("objective", ["joint", "parallel"])
@pytest.mark.parametrize("per_sequence", [True, False])
def test_mixture_of_one_objective_is_that_objective_exactly(tiny, objective, per_sequence):
    tokens = random_tokens(6, 16, seed=3)
    other = "parallel" if objective == "joint" else "joint"
    plain = ObjectiveConfig(objective=objective, per_sequence=per_sequence)
    for mixture in ({objective: 1.0, other: 0.0}, {objective: 0.25}, {other: 0, objective: 7}):
        mixed = ObjectiveConfig(mixture=mixture, per_sequence=per_sequence)
        for seed in range(3):  # rates drawn from the generator too: the whole random stream must match
            g_plain, g_mixed = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            loss_a, stats_a = compute_loss(tiny, tokens, plain, g_plain)
            loss_b, stats_b = compute_loss(tiny, tokens, mixed, g_mixed)
            assert_same_batch(stats_a["batch"], stats_b["batch"])
            assert torch.equal(loss_a, loss_b)
            assert torch.equal(g_plain.get_state(), g_mixed.get_state())
            assert bool(stats_b["batch"].parallel.all()) == (objective == "parallel")


def test_mixture_draw_follows_the_weights():
    tokens = random_tokens(4000, 8, seed=4)
    cfg = ObjectiveConfig(mixture={"joint": 0.7, "parallel": 0.3})
    batch = build_objective_batch(tokens, cfg, torch.Generator().manual_seed(0))
    fraction = batch.parallel.double().mean().item()
    assert abs(fraction - 0.3) < 0.03  # 4 standard deviations of a binomial mean at n = 4000
    # the draw depends on the normalised weights, not on how the mapping is written
    same = ObjectiveConfig(mixture={"parallel": 3, "joint": 7})
    assert torch.equal(build_objective_batch(tokens, same, torch.Generator().manual_seed(0)).parallel,
                       batch.parallel)
    again = build_objective_batch(tokens, cfg, torch.Generator().manual_seed(0))
    assert_same_batch(again, batch)
    other_seed = build_objective_batch(tokens, cfg, torch.Generator().manual_seed(1))
    assert not torch.equal(other_seed.parallel, batch.parallel)


def test_slot_weights_of_ones_change_nothing(tiny):
    tokens = random_tokens(4, 16, seed=5)
    rates = torch.tensor([0.3, 0.5, 0.8, 0.95])
    for mixture in (None, {"joint": 0.5, "parallel": 0.5}):
        base = ObjectiveConfig(objective="parallel", mixture=mixture, reduction="sum", loss_scale="snr")
        loss, stats = compute_loss(tiny, tokens, base, torch.Generator().manual_seed(1), rates=rates)
        for ones in ((1.0,), (1.0, 1.0, 1.0)):
            cfg = ObjectiveConfig(objective="parallel", mixture=mixture, reduction="sum", loss_scale="snr",
                                  slot_weights=ones)
            loss_1, stats_1 = compute_loss(tiny, tokens, cfg, torch.Generator().manual_seed(1), rates=rates)
            assert torch.equal(loss, loss_1) and torch.equal(stats["batch"].weights, stats_1["batch"].weights)


def test_slot_weights_by_hand():
    # V = 5 ids (mask id 4); every target scores logit a_t, every other id 0, so with the <mask> logit
    # dropped the target's NLL at slot t is log(e^a_t + 3) - a_t
    V, mask_id = 5, 4
    tokens = torch.tensor([[0, 1, 2, 3, 0, 1], [2, 3, 0, 1, 2, 3]])
    rates = torch.tensor([0.5, 0.34])  # 3 and 2 targets
    a = [2.0, 0.0, -1.0]
    nll = [math.log(math.exp(x) + 3) - x for x in a]
    for weights, per_slot in (((2.0, 0.5), [2.0, 0.5, 0.5]), ((0.0, 1.0, 4.0, 9.0), [0.0, 1.0, 4.0])):
        for reduction in ("sum", "mean"):
            cfg = ObjectiveConfig(objective="parallel", reduction=reduction, slot_weights=weights,
                                  mask_token_id=mask_id)
            batch = build_objective_batch(tokens, cfg, torch.Generator().manual_seed(0), rates=rates)
            logits = torch.zeros(2, 3, V)
            for b in range(2):
                for t in range(int(batch.num_predict[b])):
                    logits[b, t, int(batch.targets[b, t])] = a[t]
            loss, stats = loss_from_logits(logits, batch, cfg)
            weighted = sum(w * x for w, x in zip(per_slot, nll)) + sum(w * x for w, x in zip(per_slot[:2], nll))
            want = weighted / 2 if reduction == "sum" else weighted / 5
            assert loss.item() == pytest.approx(want, rel=1e-6)
            # the reported NLL stays unweighted
            assert stats["nll_per_sequence"].tolist() == pytest.approx([sum(nll), sum(nll[:2])], rel=1e-6)


def test_mixture_and_slot_weight_validation():
    for bad, words in (({"joint": 1, "mlm": 1}, "unknown objective"), ({"joint": -0.5}, "mixture.joint"),
                       ({"joint": 0, "parallel": 0}, "all zero"), ({}, "mixture must map"),
                       ({"joint": float("nan")}, "finite"), ({"joint": "lots"}, "must be a number")):
        with pytest.raises(ValueError, match=words):
            ObjectiveConfig(mixture=bad)
    for bad, words in (((1.0, -1.0),), "slot_weights must be finite"), (((0.0, 0.0),), "all zero"):
        with pytest.raises(ValueError, match=words):
            ObjectiveConfig(objective="parallel", slot_weights=bad[0])
    with pytest.raises(ValueError, match="slot_weights weighs the parallel"):
        ObjectiveConfig(objective="joint", slot_weights=(2.0,))
    with pytest.raises(ValueError, match="slot_weights weighs the parallel"):
        ObjectiveConfig(objective="parallel", mixture={"joint": 1, "parallel": 0}, slot_weights=(2.0,))
    assert ObjectiveConfig(mixture={"joint": 1, "parallel": 3}).probabilities() == {"joint": 0.25, "parallel": 0.75}
