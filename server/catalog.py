"""The model catalog (models.yaml): which models `pagoda serve` serves, and how.

Every error names the file, the line, the entry and the field, so that a typo in the catalog
fails at startup with a message the user can act on, e.g.
`models.yaml:17: entry 2 (id 'foo'): engine.block_size: must be a power of two`.
"""

from __future__ import annotations

import difflib
import importlib.resources
import importlib.util
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from pagoda.logs import describe_error
from pagoda.server.chat_template import ChatTemplate, read_chat_template
from pagoda.server.overload import DEFAULT_MAX_WAITING_REQUESTS
from pagoda.server.tool_parsers import PARSERS

# shipped inside the package (pagoda/models.yaml, a link to the repository's models.yaml)
DEFAULT_CATALOG = Path(str(importlib.resources.files("pagoda").joinpath("models.yaml")))
PACKAGE_SCHEME = "package://"

# The names engine.config.DTYPES accepts, repeated here because the server must not import
# torch just to read its catalog; tests/test_catalog.py checks that the two agree.
DTYPE_NAMES = ("auto", "float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half")

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_PACKAGE_SOURCE = re.compile(r"package://([A-Za-z_]\w*)/(.+)")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_IMAGE_SIZE = re.compile(r"([1-9]\d*)x([1-9]\d*)")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


# where in an entry: keys, and list indices ("lora_modules", 0, "id")
Location = tuple[str | int, ...]


class CatalogError(ValueError):
    """A catalog that cannot be read, or an entry that is invalid or cannot be resolved."""


def parse_bytes(value: Any) -> Any:
    """`"2GiB"` -> 2147483648; `"1GB"` -> 10**9; integers pass through unchanged."""
    if not isinstance(value, str):
        return value
    match = _SIZE.fullmatch(value)
    unit = match and _BYTE_UNITS.get(match.group(2).lower())
    if not unit:
        raise ValueError(
            f"expected a number of bytes or a size such as '2GiB', '512MiB' or '1GB', got {value!r}"
        )
    return int(float(match.group(1)) * unit)


Bytes = Annotated[int, BeforeValidator(parse_bytes), Field(ge=1)]


class _Strict(BaseModel):
    # strict: YAML already types its scalars; "2048" or `true` where a number belongs is a
    # mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EngineSettings(_Strict):
    """The engine.EngineConfig fields a catalog entry may set; unset ones keep their defaults."""

    dtype: Literal[DTYPE_NAMES] = "auto"  # type: ignore[valid-type]
    device: str = Field("auto", pattern=f"^({DEVICE_PATTERN.pattern})$")
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = "auto"
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    kv_cache_memory: Bytes | None = None
    kv_cache_blocks: int | None = Field(None, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    block_size: int | None = Field(None, ge=1)
    enable_prefix_caching: bool | None = None
    seed: int | None = Field(None, ge=0)
    tensor_parallel_size: int | None = Field(None, ge=1)
    generation_config: str | None = None  # auto, vllm or a folder (engine/sampling_defaults.py)
    override_generation_config: dict[str, float | int] | None = None
    max_lora_rank: int | None = Field(None, ge=1)  # default: the largest adapter's rank
    # adapter slots in all: those beyond lora_modules take adapters loaded at run time
    max_loras: int | None = Field(None, ge=1)

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int | None) -> int | None:
        if value is not None and value & (value - 1):
            raise ValueError("must be a power of two")
        return value

    @model_validator(mode="after")
    def _one_kv_cache_size(self) -> EngineSettings:
        # The engine would silently let kv_cache_blocks win.
        if self.kv_cache_blocks is not None and self.kv_cache_memory is not None:
            raise ValueError("give kv_cache_blocks or kv_cache_memory, not both")
        return self


class EmbeddingSettings(_Strict):
    """How an embedding worker batches and what its requests may ask (kind: embedding)."""

    max_batch_tokens: int | None = Field(None, ge=1)  # tokens per forward pass
    max_batch_size: int | None = Field(None, ge=1)  # inputs per forward pass
    max_queued_requests: int = Field(512, ge=1)  # beyond it: 429 with Retry-After
    matryoshka: bool = False  # `dimensions` accepted: truncate, then re-normalize
    matryoshka_dimensions: list[int] | None = None  # if given, the only sizes accepted

    @model_validator(mode="after")
    def _dimensions_for_matryoshka(self) -> EmbeddingSettings:
        if self.matryoshka_dimensions is not None and not self.matryoshka:
            raise ValueError("matryoshka_dimensions needs matryoshka: true")
        return self

    def worker_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for engine.embedding_worker.EmbeddingConfig: only those given."""
        kwargs = {"max_batch_tokens": self.max_batch_tokens, "max_batch_size": self.max_batch_size}
        return {key: value for key, value in kwargs.items() if value is not None}


# The engine settings an embedding worker takes; the others are the chat engine's.
# the engine settings a worker (embedding, image) takes; the rest are the chat engine's
WORKER_ENGINE_FIELDS = {"dtype", "device"}


class Capabilities(_Strict):
    tools: bool = False
    json_: bool = Field(False, alias="json")  # `json` would shadow BaseModel.json
    vision: bool = False
    # how `tool_choice: "auto"` output is read (server/tool_parsers.py)
    tool_call_parser: Literal[tuple(PARSERS)] = "hermes"  # type: ignore[valid-type]
    # where a reasoning model's thinking is split from its answer (server/reasoning.py)
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = None


class Pricing(_Strict):
    """USD per million tokens, and per image; what key budgets are charged."""

    input_per_1m: float = Field(ge=0)
    output_per_1m: float = Field(ge=0)
    per_image: float = Field(0.0, ge=0)


def parse_image_size(value: str) -> tuple[int, int]:
    """`"1024x768"` -> (1024, 768): width by height, each a multiple of 16."""
    match = _IMAGE_SIZE.fullmatch(value)
    if not match:
        raise ValueError(f"expected WIDTHxHEIGHT such as '1024x1024', got {value!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width % 16 or height % 16:
        raise ValueError(f"width and height must be multiples of 16, got {value!r}")
    return width, height


class ImageSettings(_Strict):
    """Image models only: sizes and steps clients may ask for, and how the pipeline runs."""

    default_size: str = "1024x1024"
    max_size: str = "2048x2048"  # the largest width and the largest height
    max_pixels: int | None = Field(None, ge=256)  # width * height (default: max_size's)
    default_steps: int = Field(28, ge=1)
    max_steps: int = Field(50, ge=1)
    default_guidance: float = Field(3.5, ge=0)
    max_sequence_length: int | None = Field(None, ge=1, le=512)  # FLUX's T5 prompt tokens
    max_batch_size: int = Field(4, ge=1)  # images per pipeline call
    # images queued or running; more get 429 (at least n's limit: any one request fits)
    max_queue: int = Field(32, ge=10)
    cpu_offload: bool = False  # diffusers' enable_model_cpu_offload (GPUs with little memory)
    vae_tiling: bool = False  # decode large images tile by tile

    @field_validator("default_size", "max_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_image_size(value)
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ImageSettings:
        width, height = parse_image_size(self.default_size)
        if not self.allows_size(width, height):
            raise ValueError(f"default_size {self.default_size} is beyond max_size or max_pixels")
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps must not exceed max_steps")
        return self

    def pixel_limit(self) -> int:
        if self.max_pixels is not None:
            return self.max_pixels
        width, height = parse_image_size(self.max_size)
        return width * height

    def allows_size(self, width: int, height: int) -> bool:
        max_width, max_height = parse_image_size(self.max_size)
        return width <= max_width and height <= max_height and width * height <= self.pixel_limit()


class LoraModule(_Strict):
    """A chat entry's LoRA adapter (a PEFT folder): served as a model of its own, `id`, on the
    entry's engine."""

    id: str = Field(pattern=r"^\S+$")
    source: str = Field(min_length=1)  # as the entry's: a folder, package://... or a hub id
    revision: str | None = Field(None, pattern=r"^\S+$")
    pricing: Pricing | None = None  # default: the entry's

    @field_validator("source")
    @classmethod
    def _package_source_form(cls, value: str) -> str:
        if value.startswith(PACKAGE_SCHEME):
            _split_package_source(value)
        return value

    @field_validator("revision")
    @classmethod
    def _revision_of_hub_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_revision(value, info.data.get("source"))


class CatalogEntry(_Strict):
    id: str = Field(pattern=r"^\S+$")
    kind: Literal["chat", "embedding", "rerank", "image"]
    source: str = Field(min_length=1)
    # a hub id's branch, tag or commit hash (default: the repository's default branch)
    revision: str | None = Field(None, pattern=r"^\S+$")
    enabled: bool = True
    engine: EngineSettings | None = None
    embedding: EmbeddingSettings | None = None
    max_model_len: int | None = Field(None, ge=1)
    # chat: requests waiting for a batch slot; more get 429 (--max-waiting-requests wins)
    max_waiting_requests: int = Field(DEFAULT_MAX_WAITING_REQUESTS, ge=1)
    capabilities: Capabilities = Capabilities()
    # chat models: a Jinja file (a path, or package://) or the template itself, used instead
    # of the tokenizer's (vLLM's --chat-template)
    chat_template: str | None = Field(None, min_length=1)
    # chat models: LoRA adapters served on this entry's engine, each under an id of its own
    lora_modules: list[LoraModule] | None = None
    image: ImageSettings | None = None
    pricing: Pricing | None = None
    description: str | None = None
    owned_by: str = "pagoda"

    # Where the entry came from: "file:line: entry N (id 'x')", and the file's folder.
    _where: str = PrivateAttr("")
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("source")
    @classmethod
    def _package_source_form(cls, value: str) -> str:
        if value.startswith(PACKAGE_SCHEME):
            _split_package_source(value)
        return value

    @field_validator("revision")
    @classmethod
    def _revision_of_hub_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_revision(value, info.data.get("source"))

    @field_validator("capabilities")
    @classmethod
    def _capabilities_for_chat(cls, value: Capabilities, info: ValidationInfo) -> Capabilities:
        if info.data.get("kind", "chat") != "chat" and value != Capabilities():
            raise ValueError("only chat models have capabilities")
        return value

    @field_validator("chat_template")
    @classmethod
    def _chat_template_for_chat(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("kind", "chat") != "chat":
            raise ValueError("only chat models have a chat template")
        if value is not None and value.startswith(PACKAGE_SCHEME):
            _split_package_source(value)
        return value

    @field_validator("lora_modules")
    @classmethod
    def _lora_for_chat(cls, value: list[LoraModule] | None, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("kind", "chat") != "chat":
            raise ValueError("only chat models take LoRA adapters")
        slots = getattr(info.data.get("engine"), "max_loras", None)
        if value is not None and slots is not None and slots < len(value):
            raise ValueError(f"{len(value)} adapters and engine.max_loras {slots}: raise it")
        return value

    @field_validator("max_waiting_requests")
    @classmethod
    def _chat_queue(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("kind") != "chat":
            raise ValueError(
                "only chat models (embedding, rerank: max_queued_requests; image: max_queue)"
            )
        return value

    @field_validator("engine")
    @classmethod
    def _worker_engine(cls, value: EngineSettings | None, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        extra = sorted(value.model_fields_set - WORKER_ENGINE_FIELDS) if value is not None else []
        if kind in ("embedding", "rerank", "image") and extra:
            article = "an" if kind[0] in "aeiou" else "a"
            raise ValueError(f"{article} {kind} model takes only dtype and device, not {extra[0]}")
        return value

    @field_validator("max_model_len", "image")
    @classmethod
    def _image_only(cls, value: Any, info: ValidationInfo) -> Any:
        is_image = info.data.get("kind") == "image"
        if value is not None and is_image != (info.field_name == "image"):
            raise ValueError(f"not for {info.data.get('kind')} models")
        return value

    def image_settings(self) -> ImageSettings:
        return self.image if self.image is not None else ImageSettings()

    @field_validator("embedding")
    @classmethod
    def _embedding_settings(
        cls, value: EmbeddingSettings | None, info: ValidationInfo
    ) -> EmbeddingSettings | None:
        kind = info.data.get("kind")
        if value is not None and kind not in ("embedding", "rerank"):
            raise ValueError("only embedding models (and rerank models) have embedding settings")
        if value is not None and kind == "rerank" and value.matryoshka:
            raise ValueError("matryoshka is for embedding models, not rerank models")
        return value

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for engine.EngineConfig besides `model`: only those given."""
        if self.engine is None:
            kwargs: dict[str, Any] = {}
        else:
            kwargs = self.engine.model_dump(exclude_unset=True, exclude_none=True)
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        return kwargs


def _check_revision(revision: str | None, source: str | None) -> str | None:
    if revision is not None and source is not None and not _looks_like_hub_id(source):
        raise ValueError(f"only for a hub id's source; {source!r} is {_local_kind(source)}")
    return revision


def _split_package_source(source: str) -> tuple[str, str]:
    match = _PACKAGE_SOURCE.fullmatch(source)
    parts = match.group(2).split("/") if match else []
    if not match or any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"expected package://<python_package>/<relative/path> inside the package, "
            f"got {source!r}"
        )
    return match.group(1), match.group(2)


# --- loading -----------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader that rejects duplicate keys, which PyYAML would silently overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def load_catalog(path: str | Path) -> list[CatalogEntry]:
    """All entries of the catalog at `path`, validated (disabled ones included)."""
    path = Path(path)
    data, root = _read_yaml(path)
    items, item_nodes = _models_list(path, data, root)
    entries: list[CatalogEntry] = []
    errors: list[str] = []
    first_use: dict[str, str] = {}  # a served id (a model's, an adapter's) -> where it is given
    for index, (item, node) in enumerate(zip(items, item_nodes)):
        entry, entry_errors = _validate_entry(path, index, item, node)
        errors += entry_errors
        if entry is None:
            continue
        for loc, served_id in _served_ids(entry):
            if served_id in first_use:
                where = f"{path}:{_line_of(node, loc)}: {_label(index, item)}"
                errors.append(f"{where}: {_dotted(loc)}: duplicate of {first_use[served_id]}")
            owner = f"entry {index + 1}"
            first_use.setdefault(served_id, owner if loc == ("id",) else f"{owner}'s {loc[0]}")
        entries.append(entry)
    if errors:
        raise CatalogError("\n".join(errors))
    return entries


def _read_yaml(path: Path) -> tuple[Any, yaml.Node]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(f"{path}: no such catalog file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc}") from None
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise CatalogError(f"{path}: empty catalog: expected a 'models' list")
        return loader.construct_document(root), root
    except yaml.MarkedYAMLError as exc:
        raise CatalogError(_describe_yaml_error(path, exc)) from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _describe_yaml_error(path: Path, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    text = f"{path}:{mark.line + 1}" if mark else str(path)
    text += f": invalid YAML: {exc.problem or exc}"
    if exc.context and exc.context_mark and exc.context_mark is not mark:
        text += f" ({exc.context} at line {exc.context_mark.line + 1})"
    return text


def _models_list(path: Path, data: Any, root: yaml.Node) -> tuple[list, list[yaml.Node]]:
    """The `models` list and the YAML node of each of its items (for line numbers)."""
    if not isinstance(data, dict) or "models" not in data:
        keys = f" (found {', '.join(map(repr, data))})" if isinstance(data, dict) and data else ""
        raise CatalogError(f"{path}: expected a top-level mapping with a 'models' list{keys}")
    unknown = sorted(set(data) - {"models"}, key=str)
    if unknown:
        raise CatalogError(f"{path}: unknown top-level key {unknown[0]!r} (only 'models')")
    if not isinstance(data["models"], list):
        got = type(data["models"]).__name__
        raise CatalogError(f"{path}: models: expected a list of entries, got {got}")
    _, models_node = _find_key(root, "models")
    assert isinstance(models_node, yaml.SequenceNode)  # a list in `data`, so a sequence here
    return data["models"], models_node.value


def _validate_entry(
    path: Path, index: int, item: Any, node: yaml.Node
) -> tuple[CatalogEntry | None, list[str]]:
    label = _label(index, item)
    if not isinstance(item, dict):
        return None, [f"{path}:{_line_of(node, ())}: {label}: expected a mapping"]
    try:
        entry = CatalogEntry.model_validate(item)
    except ValidationError as exc:
        errors = [_describe_error(err) for err in exc.errors(include_url=False)]
        errors.sort(key=lambda error: _line_of(node, error[0]))
        return None, [f"{path}:{_line_of(node, loc)}: {label}: {text}" for loc, text in errors]
    entry._where = f"{path}:{_line_of(node, ())}: {label}"
    entry._base_dir = path.resolve().parent
    return entry, []


def _label(index: int, item: Any) -> str:
    entry_id = item.get("id") if isinstance(item, dict) else None
    return f"entry {index + 1}" + (f" (id {entry_id!r})" if isinstance(entry_id, str) else "")


def _served_ids(entry: CatalogEntry) -> list[tuple[Location, str]]:
    """The ids clients send for the entry (its own, its adapters'), and where each is given."""
    adapters = entry.lora_modules or []
    return [(("id",), entry.id)] + [
        (("lora_modules", i, "id"), a.id) for i, a in enumerate(adapters)
    ]


def _describe_error(err: ErrorDetails) -> tuple[Location, str]:
    """The error's location in the entry, and "field.path: message"."""
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        message = "unknown field" + _suggestion(loc)
    elif kind == "missing":
        message = "required"
    elif kind == "value_error":
        message = str(err["ctx"]["error"])
    else:
        message = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {err['input']!r}"
    return loc, f"{_dotted(loc)}: {message}" if loc else message


def _dotted(loc: Location) -> str:
    """("lora_modules", 0, "id") -> "lora_modules[0].id"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


_SECTIONS: dict[str, type[BaseModel]] = {
    "engine": EngineSettings,
    "embedding": EmbeddingSettings,
    "capabilities": Capabilities,
    "image": ImageSettings,
    "pricing": Pricing,
    "lora_modules": LoraModule,
}


def _suggestion(loc: Location) -> str:
    loc = tuple(part for part in loc if isinstance(part, str))  # a list's item is its section
    model = CatalogEntry if len(loc) == 1 else _SECTIONS.get(loc[0])
    if model is None:
        return ""
    names = [info.alias or name for name, info in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _find_key(node: yaml.Node, key: str) -> tuple[yaml.Node | None, yaml.Node | None]:
    """The key node and value node of `key` in a mapping node, or (None, None)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return key_node, value_node
    return None, None


def _line_of(node: yaml.Node, loc: Location) -> int:
    """The 1-based line of the deepest key (or list item) along `loc` present in the YAML
    (else of `node`)."""
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(part, int):
            items = node.value if isinstance(node, yaml.SequenceNode) else []
            if part >= len(items):
                break
            node = items[part]
            line = node.start_mark.line + 1
            continue
        key_node, node = _find_key(node, part)
        if key_node is None or node is None:
            break
        line = key_node.start_mark.line + 1
    return line


# --- sources -----------------------------------------------------------------------------


def resolve_source(entry: CatalogEntry, base_dir: Path | None = None) -> str:
    """The path or hub id that engine.LLM / EngineConfig(model=...) accepts for `entry`.

    `package://pkg/rel` -> the absolute path of `rel` inside the installed package `pkg`
    (found without importing it); a path -> an absolute path (relative ones are taken from
    `base_dir`, by default the folder of the catalog the entry came from); anything else of
    the form `org/name` is a hub id, returned as is.
    """
    return resolve_path(entry, entry.source, "source", base_dir)


def resolve_path(entry: CatalogEntry, source: str, field: str, base_dir: Path | None = None) -> str:
    """A source of the entry's (its own, an adapter's) resolved as resolve_source says; an
    error names the entry and `field`."""
    base_dir = Path(base_dir) if base_dir is not None else entry._base_dir
    if source.startswith(PACKAGE_SCHEME):
        return str(_package_path(entry, *_split_package_source(source), field))
    path = (base_dir / Path(source).expanduser()).resolve()
    if path.exists():
        return str(path)
    if _looks_like_hub_id(source):
        return source
    raise entry_error(entry, f"{path} does not exist", field)


def _looks_like_hub_id(source: str) -> bool:
    explicit_path = source.startswith((".", "/", "~")) or source.endswith(".gguf")
    return not explicit_path and _HUB_ID.fullmatch(source) is not None


def _local_kind(source: str) -> str:
    return "a package's file" if source.startswith(PACKAGE_SCHEME) else "a local path"


def resolve_revision(entry: CatalogEntry) -> str | None:
    """The commit the entry's weights are served at (hub_commit); None for a local source."""
    source = resolve_source(entry)
    try:
        return hub_commit(source, entry.revision)
    except ValueError as exc:
        raise entry_error(entry, str(exc), "revision" if entry.revision else "source") from None


def hub_commit(source: str, revision: str | None) -> str | None:
    """The commit a hub id's weights are served at: `revision` (a branch, tag or commit hash;
    default the repository's default branch) as the hub has it, or as the hub cache recorded it
    where the hub cannot be reached (HF_HUB_OFFLINE). None for a local source (an absolute
    path, as resolve_source gives one).

    Resolved once, in the server, so that every process loads that one commit, and the log says
    which it is."""
    if Path(source).is_absolute():
        if revision is not None:  # a hub-id-like source that is a folder by the catalog
            raise ValueError(f"only for a hub id's source; {source} is a local path")
        return None
    from huggingface_hub import constants
    from huggingface_hub import resolve_revision as resolve_on_hub

    try:
        # offline, straight from the cache (without: a warning that the hub cannot be reached)
        offline = constants.HF_HUB_OFFLINE
        return resolve_on_hub(source, revision=revision, local_files_only=offline).resolved
    except Exception as exc:  # offline and not cached, unknown repository or revision, ...
        if revision is None:
            message = f"{source!r} is neither a local path nor a downloadable hub id"
        else:
            message = f"no revision {revision!r} of {source!r} on the hub or in its cache"
        raise ValueError(f"{message}: {describe_error(exc)}") from None


def resolve_chat_template(entry: CatalogEntry) -> ChatTemplate | None:
    """The entry's chat_template, read and checked: a `package://` file, a file at a path (a
    relative one from the catalog's folder), or the template itself (read_chat_template)."""
    value = entry.chat_template
    if value is None:
        return None
    if value.startswith(PACKAGE_SCHEME):
        package, relative = _split_package_source(value)
        value = str(_package_path(entry, package, relative, "chat_template"))
    try:
        return read_chat_template(value, entry._base_dir)
    except ValueError as exc:
        raise entry_error(entry, str(exc), "chat_template") from None


def _package_path(entry: CatalogEntry, package: str, relative: str, field: str = "source") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise entry_error(
            entry,
            f"Python package {package!r} is not installed "
            f"(pip install the distribution that provides it)",
            field,
        )
    if spec.submodule_search_locations is None:
        raise entry_error(entry, f"{package!r} is a module, not a package", field)
    folders = [Path(folder) for folder in spec.submodule_search_locations]
    for folder in folders:
        if (folder / relative).exists():
            return (folder / relative).resolve()
    message = f"{relative!r} not found in package {package!r} ({folders[0]})"
    raise entry_error(entry, message, field)


def entry_error(entry: CatalogEntry, message: str, field: str = "source") -> CatalogError:
    """An error about one of the entry's fields, naming the file, line and entry."""
    where = entry._where or f"id {entry.id!r}"
    return CatalogError(f"{where}: {field}: {message}")
