import pytest
import torch

from asarm.paths import data_file

# Test models are tiny: thread start-up costs more than it saves, and a loaded 2-core machine
# makes multi-threaded tiny kernels orders of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def xlnet_tokenizer():
    """The real XLNet SentencePiece tokenizer from the data directory (no network)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(data_file("xlnet-base-cased")))


@pytest.fixture
def hub_offline(monkeypatch):
    """Make the Hugging Face Hub answer 'offline' at once instead of waiting for network timeouts."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, xlnet_tokenizer):
    """A saved tiny random AS-ARM with the real XLNet tokenizer, for end-to-end command tests."""
    from asarm.model import ASARM

    path = tmp_path_factory.mktemp("tiny_model")
    ASARM.from_config(tokenizer=xlnet_tokenizer, d_model=16, n_layer=1, n_head=2, d_inner=32, seed=0,
                      device="cpu").save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="session")
def no_load_warnings():
    """The machine's load (other tests, other jobs) is not what an evaluation test checks: results record no
    load average unless a test sets one (tests/test_resources.py does). Session-wide, so that module-scoped
    fixtures that run an evaluation see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("asarm.eval.record.load_average", lambda: None)
        yield
