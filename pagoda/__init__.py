"""pagoda: an inference server that speaks the OpenAI HTTP contract.

Installed, the repository's top-level folders are subpackages of this one (pyproject.toml maps
them): `pagoda.server` (HTTP, text), `pagoda.engine` (tokens, scheduling, models) and
`pagoda.kernels` (device code). The offline API is re-exported here, imported on first use so
that `import pagoda.server` does not load torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("pagoda")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

# A source checkout used without installing it (`PYTHONPATH=checkout`, or pytest run from the
# checkout beside a non-editable install): the subpackages are the checkout's top-level
# folders. An installed copy has no pyproject.toml beside it and is left alone.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "engine").is_dir():
    __path__.append(str(_checkout))

if TYPE_CHECKING:
    from pagoda.engine import LLM, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "SamplingParams", "StructuredOutputsParams"):
        from pagoda import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
