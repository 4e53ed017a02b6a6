"""`pagoda tokenizer export MODEL DIR`: the tokenizer a model is served with, as a Hugging Face
folder, for clients that tokenize on their side (guidellm, benchmarks/serve.py, lm-eval) and
cannot read a tokenizer out of a GGUF file or reach the hub.

The folder is what transformers 4 and 5 both read: tokenizer.json, a tokenizer_config.json
that holds the chat template, the served context length and a class name transformers 4 knows
(5's `TokenizersBackend` is unknown to 4), and special_tokens_map.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pagoda.server.arg_types import at_least
from pagoda.server.catalog import (
    DEFAULT_CATALOG,
    CatalogError,
    load_catalog,
    resolve_chat_template,
    resolve_revision,
    resolve_source,
)
from pagoda.server.chat_template import ChatTemplate, chat_template_flag
from pagoda.server.tokenizer_info import LOCATION_KEYS

# the name transformers 4 and 5 both map to a tokenizer built from tokenizer.json alone
PORTABLE_CLASS = "PreTrainedTokenizerFast"


def add_parser(commands: argparse._SubParsersAction) -> None:
    tokenizer = commands.add_parser("tokenizer", help="the tokenizers of the served models")
    actions = tokenizer.add_subparsers(dest="action", required=True)
    export = actions.add_parser(
        "export",
        help="write a served model's tokenizer as a Hugging Face folder",
        description="Write MODEL's tokenizer to DIR so that AutoTokenizer.from_pretrained(DIR) "
        "gives the ids the server uses.",
    )
    export.add_argument("model", help="a model id of the catalog, or a model folder or .gguf")
    export.add_argument("dir", type=Path, help="folder to write (created if missing)")
    export.add_argument("--catalog", default=str(DEFAULT_CATALOG), help="models.yaml to read")
    export.add_argument(
        "--max-model-len",
        type=at_least(1),
        help="model_max_length to write (default: the catalog's, else the model's own)",
    )
    export.add_argument(
        "--chat-template",
        help="the chat template to write instead (a Jinja file, or the template itself), as "
        "pagoda serve --chat-template serves it (default: the catalog's, else the model's own)",
    )


@dataclass(frozen=True)
class ServedModelSource:
    """What a served model's tokenizer is made of: the weights' path, or their hub id and the
    commit served, and the catalog's max_model_len and chat template."""

    source: str
    revision: str | None = None
    max_model_len: int | None = None
    chat_template: ChatTemplate | None = None


def run(args: argparse.Namespace) -> int:
    try:
        served = model_source(args.model, args.catalog)
        if args.chat_template is not None:
            served = replace(served, chat_template=chat_template_flag(args.chat_template))
        tokenizer = load_served_tokenizer(served)
        max_model_len = (
            args.max_model_len
            or served.max_model_len
            or model_context_length(served.source, served.revision)
        )
        files = save_tokenizer_folder(tokenizer, args.dir, max_model_len)
    except (CatalogError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(str(f) for f in files))
    return 0


def model_source(model: str, catalog: str | Path) -> ServedModelSource:
    """How a catalog's chat model, or the model at a path, is served."""
    entries = [e for e in load_catalog(catalog) if e.kind == "chat"]
    for entry in entries:
        if entry.id == model:
            return ServedModelSource(
                resolve_source(entry),
                resolve_revision(entry),
                entry.max_model_len,
                resolve_chat_template(entry),
            )
    if Path(model).expanduser().exists():
        return ServedModelSource(str(Path(model).expanduser()))
    ids = ", ".join(e.id for e in entries)
    raise ValueError(
        f"{model!r} is neither a chat model id of {catalog} ({ids}) nor an existing path"
    )


def load_served_tokenizer(served: ServedModelSource) -> Any:
    """The tokenizer `pagoda serve` loads for the model, with its chat template."""
    from pagoda.engine import loader  # imports torch: only for this command

    tokenizer = loader.load_tokenizer(loader.resolve_source(served.source, served.revision))
    if served.chat_template is not None:
        tokenizer.chat_template = served.chat_template.text
    return tokenizer


def model_context_length(source: str, revision: str | None = None) -> int:
    from pagoda.engine import loader
    from pagoda.kernels.rotary import context_length

    config = loader.load_config(loader.resolve_source(source, revision))
    return context_length(config.rope_parameters, config.max_position_embeddings)


def save_tokenizer_folder(tokenizer: Any, folder: Path, max_model_len: int) -> list[Path]:
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} has no tokenizer.json to export")
    # the chat template inside tokenizer_config.json, where transformers 4 looks for it
    saved = tokenizer.save_pretrained(folder, save_jinja_files=False)
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config = portable_config(config, max_model_len)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    special_path = Path(folder) / "special_tokens_map.json"
    special = {k: config[k] for k in tokenizer.special_tokens_map if k in config}
    if "additional_special_tokens" in config:
        special["additional_special_tokens"] = config["additional_special_tokens"]
    special_path.write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return sorted({Path(p) for p in saved} | {special_path})


def portable_config(config: dict[str, Any], max_model_len: int) -> dict[str, Any]:
    config = {k: v for k, v in config.items() if k not in LOCATION_KEYS}
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = PORTABLE_CLASS
    # transformers 5 writes a list here; 4 wants a mapping, and both read this older key
    if isinstance(config.get("extra_special_tokens"), list):
        extra = config.pop("extra_special_tokens")
        if extra:
            config["additional_special_tokens"] = extra
    config["model_max_length"] = max_model_len
    return config
