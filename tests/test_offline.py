"""Every Hub access fails fast with the network blocked: one probe, then the local cache or one line, never
huggingface_hub's or datasets' retries."""

import socket
from pathlib import Path

import pytest

from asarm.paths import DataFileNotFoundError


@pytest.fixture
def network_blocked(monkeypatch):
    """Every name lookup fails (as on a machine with no network); returns the list of attempts."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def refuse(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


# asarm's probe, plus huggingface_hub's one fetch of its user-agent registry (once per process); its retries
# (5 per file) would be many more
FEW = 2


def _hub_cached(repo: str) -> bool:
    return (Path.home() / ".cache" / "huggingface" / "hub" / f"models--{repo.replace('/', '--')}").exists()


def test_perplexity_model(network_blocked):
    from asarm.eval.perplexity import try_load_causal_lm

    if _hub_cached("gpt2-large"):
        pytest.skip("gpt2-large is in the local cache")
    model, reason = try_load_causal_lm("gpt2-large")
    assert model is None and "not reachable" in reason and "local cache" in reason
    assert len(network_blocked) <= FEW


def test_entropy_tokenizer_fallback(network_blocked, monkeypatch):
    from asarm.eval import perplexity

    if _hub_cached("gpt2"):
        pytest.skip("gpt2 is in the local cache")
    monkeypatch.setattr(perplexity, "data_file", lambda *args, **kwargs: None)
    tokenizer, reason = perplexity.entropy_tokenizer()
    assert tokenizer is None and "the Hub failed" in reason
    assert len(network_blocked) <= FEW


def test_lm_task_dataset(network_blocked, monkeypatch, tmp_path):
    from asarm.eval import lm_tasks

    monkeypatch.setenv("ASARM_DATA_DIR", str(tmp_path))  # no local LAMBADA file
    with pytest.raises(DataFileNotFoundError, match="cannot be fetched: the Hugging Face Hub is not reachable"):
        lm_tasks.load_lambada(None)
    assert len(network_blocked) <= FEW


def test_hub_text_source(network_blocked):
    from asarm.training.data import DataSourceError, hub_source

    with pytest.raises(DataSourceError, match="the Hugging Face Hub is not reachable"):
        hub_source("wikitext-2").open()
    assert len(network_blocked) <= FEW


def test_hub_model(network_blocked):
    from asarm.model import ASARM, ModelLoadError

    with pytest.raises(ModelLoadError, match="not reachable"):
        ASARM.from_pretrained("someone/not-cached-model")
    assert len(network_blocked) <= FEW
