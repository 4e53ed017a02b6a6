"""pagoda's folder in the user's cache: compiled CPU kernels, converted GGUF tokenizers and
GGUF header indexes, and the images behind URLs unless `--image-dir` says otherwise."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/pagoda, else ~/.cache/pagoda."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pagoda"
