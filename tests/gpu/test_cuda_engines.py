"""On CUDA, the cached engine gives the full forward's logits at every call of ASSD's call pattern, in
float32 and bfloat16 (the CPU suite, tests/test_cached_engine.py, checks float32 and float64; its call
pattern and comparison are reused here), on both backbones."""

import pytest
import torch

import test_cached_engine as engines
from asarm import orders

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# float32: the CPU bound. bfloat16 keeps 8 bits of mantissa, so the two engines' summation orders of
# the same logits (one forward over all positions, or cached keys and values) differ by a few units in
# the last place of a logit of size ~10: an absolute bound, not a calibrated one.
CUDA_TOL = {torch.float32: 1e-4, torch.bfloat16: 0.25}


class CudaPair(engines.Pair):
    """``engines.Pair`` with every tensor moved to the model's device, as the samplers pass them."""

    def __init__(self, model, tokens, sigma, n_prompt, **engine_kwargs):
        device = model.device
        super().__init__(model, tokens.to(device), sigma.to(device), torch.as_tensor(n_prompt).to(device),
                         **engine_kwargs)
        self.device = device

    def __call__(self, rows, tokens, n_fixed, query_ranks, draft=False, limits=None):
        def move(t):
            return None if t is None else t.to(self.device)

        return super().__call__(move(rows), move(tokens), move(n_fixed), move(query_ranks), draft, move(limits))


@pytest.mark.parametrize("backbone", ["xlnet", "rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", [orders.any_subset, orders.any_permutation])
def test_cached_engine_matches_the_full_forward_on_cuda(dtype, order, backbone, monkeypatch):
    monkeypatch.setattr(engines, "BACKBONE", backbone)
    monkeypatch.setitem(engines.TOL, dtype, CUDA_TOL[dtype])
    monkeypatch.setattr(engines, "Pair", CudaPair)
    model = engines.make_model(dtype, seed=1).to("cuda")
    pair, _, verify_drafts = engines.simulate_assd(model, batch=4, seq_len=24, lengths=[24, 24, 17, 9],
                                                   n_prompt=[2, 5, 1, 3], order=order, seed=7)
    assert pair.calls > 10 and verify_drafts > 0
    print(f"{dtype}: {pair.calls} calls, largest logit difference {pair.worst:.3g}")
