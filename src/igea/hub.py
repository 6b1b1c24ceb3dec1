"""Is the Hugging Face hub reachable? Asked once, in a few seconds, before anything downloads.

huggingface_hub retries an unreachable host for about half a minute; igea asks first, so an offline
machine gets one clear line at once (or the local cache, for models already downloaded).
"""

from __future__ import annotations

import functools
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False in offline mode (HF_HUB_OFFLINE=1) or when the hub endpoint does not accept a connection."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
