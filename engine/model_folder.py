"""What a folder of weights must hold for the engine, or an embedding or reranking worker, to
run it, read from its files alone (no torch, no transformers): `pagoda serve` checks its local
folders with this before its imports (server/preflight.py), and the engine's loader and the
reranking worker check theirs with it too."""

from __future__ import annotations

import json
from pathlib import Path

# the `architectures` engine/models runs (tests/test_loading.py checks that both agree)
ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)


def unsupported_architecture(architectures: list[str] | None) -> str:
    return f"unsupported model architecture {architectures}; supported: {', '.join(ARCHITECTURES)}"


def gguf_file_of(folder: Path) -> str | None:
    """The .gguf file a folder without config.json is served from; None for a folder with a
    config.json the engine runs. ValueError for a folder with neither, a config.json that is
    not JSON, or one of an architecture the engine does not run."""
    config = folder / "config.json"
    if not config.exists():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ValueError(f"model folder {str(folder)!r} has no config.json (nor one .gguf file)")
    check_config(config)
    return None


def check_config(path: Path) -> None:
    """A config.json the engine runs. Left to transformers, a model of its own code would have
    it ask on the terminal whether to run that code, and an unknown model type would get its
    advice to pass trust_remote_code=True, an option pagoda does not have."""
    raw = _read_config(path)
    architectures = raw.get("architectures")
    if any(arch in ARCHITECTURES for arch in architectures or []):
        return
    own_code = " (its own code, config.json's auto_map, which pagoda never runs)"
    raise ValueError(
        f"{unsupported_architecture(architectures)}; model_type {raw.get('model_type')!r}"
        + (own_code if "auto_map" in raw else "")
    )


def check_sentence_transformers_folder(folder: Path, cross_encoder: bool) -> None:
    """A folder an embedding (or, `cross_encoder`, a reranking) worker can load: a config.json
    (an embedding model may have modules.json instead, its modules' folders holding theirs), and
    for a reranker one that cross_encoder_problem finds nothing in."""
    path = folder / "config.json"
    if not path.exists():
        if not cross_encoder and (folder / "modules.json").exists():
            return
        what = "config.json" if cross_encoder else "config.json nor modules.json"
        raise ValueError(f"model folder {str(folder)!r} has no {what}")
    raw = _read_config(path)
    if cross_encoder:
        labels = raw.get("id2label")
        num_labels = len(labels) if isinstance(labels, dict) else None
        problem = cross_encoder_problem(str(folder), raw.get("architectures") or [], num_labels)
        if problem is not None:
            raise ValueError(problem)


def cross_encoder_problem(
    name: str, architectures: list[str], num_labels: int | None
) -> str | None:
    """Why a model is no reranker that pagoda serves, from the architectures it was saved as and
    its number of labels (None: unknown); None where neither says so."""
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        # sentence-transformers' CrossEncoder would put a random head on it (an embedding model)
        return (
            f"{name} was saved as {', '.join(architectures)}, not a sequence classifier: it is "
            "no cross-encoder (an embedding model is kind: embedding)"
        )
    if num_labels is not None and num_labels != 1:
        return (
            f"{name} is a cross-encoder with {num_labels} labels: a reranker gives one score per "
            "pair (num_labels 1)"
        )
    return None


def _read_config(path: Path) -> dict:
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    return raw
