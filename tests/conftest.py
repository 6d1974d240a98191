import pytest

from asarm.paths import data_file


@pytest.fixture(scope="session")
def xlnet_tokenizer():
    """The real XLNet SentencePiece tokenizer from the data directory (no network)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(data_file("xlnet-base-cased")))
