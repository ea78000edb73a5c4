"""Where tpserve caches what it builds on a machine (the collectives library, gRPC stubs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$TPSERVE_CACHE_DIR, else ~/.cache/tpserve."""
    return Path(os.environ.get("TPSERVE_CACHE_DIR", Path.home() / ".cache" / "tpserve"))
