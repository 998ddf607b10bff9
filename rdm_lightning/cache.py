"""Where the library caches what it trains itself (digits teacher, classifiers)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$RDM_CACHE`` if set, else ``~/.cache/rdm_lightning``."""
    return Path(os.environ.get("RDM_CACHE", Path.home() / ".cache" / "rdm_lightning")).expanduser()
