"""The brute-force exactness suite (tests/sampling/test_exactness.py) on CUDA: a representative subset of
its samplers, on both engines, against the exact joint computed on the CPU, plus its negative control."""

import copy
import warnings

import pytest
import torch

from asarm.sampling import LossySamplingWarning, assd_decode
from sampling.test_exactness import ROWS_PER_ORDER, SAMPLERS, _check, setup  # noqa: F401 (setup: fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_SAMPLERS = ["sequential", "sequential-T0.7", "assd-self-k3", "assd-ngram-k3", "assd-bonus-k3",
                 "assd-fused-k3", "assd-fused-k3-T0.7-target", "assd-adaptive-k3"]


@pytest.fixture(scope="module")
def cuda_setup(setup):  # noqa: F811 (the fixture imported above)
    model, tokens, sigma, n_prompt, joints = setup
    return copy.deepcopy(model).to("cuda"), tokens.cuda(), sigma.cuda(), n_prompt.cuda(), joints


@pytest.mark.parametrize("engine", ["full", "cached"])
@pytest.mark.parametrize("name", CUDA_SAMPLERS)
def test_sampler_matches_exact_joint_on_cuda(cuda_setup, name, engine):
    model, tokens, sigma, n_prompt, joints = cuda_setup
    sampler, kwargs, target_temperature = SAMPLERS[name]
    out = sampler(model, tokens, sigma, n_prompt, seed=12345, engine=engine, **kwargs)
    assert out.exact and out.tokens.device.type == "cuda"
    _check(out.tokens.cpu(), joints[target_temperature])


def test_unverified_drafts_are_rejected_on_cuda(cuda_setup):
    model, tokens, sigma, n_prompt, joints = cuda_setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossySamplingWarning)
        out = assd_decode(model, tokens, sigma, n_prompt, k=5, r_atol=1e9, seed=12345, engine="cached")
    with pytest.raises(AssertionError):
        _check(out.tokens.cpu(), joints[1.0])
    assert len(out.tokens) == 2 * ROWS_PER_ORDER
