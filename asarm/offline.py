"""Whether the Hugging Face Hub can be reached, decided by one quick request.

huggingface_hub retries every file 5 times with back-off (about 23 s per file) before giving up, and
``datasets`` does the same for each dataset. Every Hub access in asarm (models, tokenizers, the perplexity
model, datasets) asks :func:`hub_offline` first and, when it is offline, reads the local cache only or
stops with one line (:func:`offline_reason` says why).
"""

from __future__ import annotations

__all__ = ["hub_offline", "offline_reason", "HUB_PROBE_TIMEOUT_S"]

HUB_PROBE_TIMEOUT_S = 5.0


def _offline_flag() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set or one quick request to the Hub fails."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if _offline_flag():
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - DNS, refused connection, timeout, TLS: all mean "not reachable"
        return True
    return False


def offline_reason() -> str:
    return "HF_HUB_OFFLINE is set" if _offline_flag() else "the Hugging Face Hub is not reachable"
