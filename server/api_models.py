"""The response bodies the server sends, as pydantic models: what /openapi.json documents.

The handlers build their responses as plain dicts on the hot path; these models describe them
(tests/test_openapi.py checks every served response against them with schemathesis). Objects
may carry fields beyond those listed (extensions such as an image's `seed`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, for every status of 400 and above."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: None
    max_model_len: int
    permission: list[dict[str, Any]]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[ToolCall] | None = None


# "abort": the engine dropped the request (a drain that ran out of time)
FinishReason = Literal["stop", "length", "tool_calls", "abort"] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None
    # vLLM's, when the request asks `prompt_logprobs`: per prompt token (None for the first),
    # keyed by token id
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`
    (after an error: an ErrorResponse event, then `[DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # with stream_options.include_usage: the last chunk's


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason
    # vLLM's, when the request asks `prompt_logprobs`: per prompt token (None for the first),
    # keyed by token id
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class Completion(BaseModel):
    """A completion, and (object alike) each `data:` event of a streamed one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: None


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class RerankDocumentText(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int  # the document's place in the request
    relevance_score: float
    document: RerankDocumentText | None = None  # absent with return_documents false


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]  # the best first, cut at top_n


class Score(BaseModel):
    object: Literal["score"]
    index: int
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int


class ScoreList(BaseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[Score]
    usage: ScoreUsage


class ImageData(BaseModel):
    seed: int  # an extension: the seed that remakes this image
    url: str | None = None
    b64_json: str | None = None


class ImageInputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class ImageUsage(BaseModel):
    """The prompt's tokens in the text encoder (FLUX's T5; 0 for other pipelines) and the
    image tokens the denoiser made (FLUX's 16x16-pixel latent patches; 0 for others)."""

    input_tokens: int
    input_tokens_details: ImageInputTokensDetails
    output_tokens: int
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"]
    output_format: Literal["png", "jpeg", "webp"]
    quality: str
    size: str
    usage: ImageUsage


class ImageStreamEvent(BaseModel):
    """An event of a streamed image request (SSE `event:` is its type): each preview
    (`image_generation.partial_image`, with its index), then the image
    (`image_generation.completed`, with its seed and usage)."""

    type: Literal["image_generation.partial_image", "image_generation.completed"]
    b64_json: str
    created_at: int
    output_format: Literal["png", "jpeg", "webp"]
    quality: str
    size: str
    background: Literal["opaque"]
    partial_image_index: int | None = None
    seed: int | None = None
    usage: ImageUsage | None = None


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    # with include message.output_text.logprobs: per token {token, logprob, bytes, top_logprobs}
    logprobs: list[dict[str, Any]] = []


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"]
    text: str


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: ItemStatus
    content: list[OutputText]


class OutputReasoning(BaseModel):
    id: str
    type: Literal["reasoning"]
    summary: list[Any]
    content: list[ReasoningText]
    status: ItemStatus


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text
    status: ItemStatus


OutputItem = Annotated[
    OutputMessage | OutputReasoning | OutputFunctionCall, Field(discriminator="type")
]


class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseObject(BaseModel):
    """A response of /v1/responses (OpenAI's `Response`); `usage` is null until it ends."""

    id: str
    object: Literal["response"]
    created_at: int
    completed_at: int | None = None
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    background: bool
    error: dict[str, Any] | None
    incomplete_details: dict[str, str] | None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: dict[str, Any]
    store: bool
    temperature: float | None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_logprobs: int
    top_p: float | None
    truncation: Literal["disabled"]
    usage: ResponseUsage | None
    user: str | None


class ResponseStreamEvent(BaseModel):
    """One event of a streamed response (SSE `event:` is its type): `response.created`,
    `response.in_progress`, per output item `response.output_item.added`, its parts and deltas
    and `response.output_item.done`, then `response.completed`, `response.incomplete` or
    `response.failed` with the whole response."""

    type: str
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    item_id: str | None = None
    content_index: int | None = None
    item: OutputItem | None = None
    part: OutputText | ReasoningText | None = None
    delta: str | None = None
    text: str | None = None
    arguments: str | None = None
    logprobs: list[Any] | None = None


class InputItemList(BaseModel):
    """A page of a stored response's input items: messages, function calls and their
    outputs, reasoning items, each with its `id`."""

    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class ModelHealth(BaseModel):
    status: str  # "ready", "starting", "restarting" or "failed"
    reason: str | None = None  # why it is not ready
    restarts: int = 0
    pid: int | None = None
    replicas: list[ModelHealth] | None = None  # --data-parallel-size: one line per replica


class Health(BaseModel):
    """/health: "ok" (200), "degraded" (200: some models down) or "unhealthy" (503);
    /health?model= answers with that model's ModelHealth (200 ready, else 503)."""

    status: str
    models: dict[str, ModelHealth] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(None, description="with return_token_strs")


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """The tokenizer's configuration as tokenizer_config.json holds it (vLLM's endpoint)."""

    tokenizer_class: str
    model_max_length: int
    chat_template: str | None = None


class KeyRow(BaseModel):
    name: str = Field(description="and the key's limits, budget and times")


class KeyList(BaseModel):
    object: Literal["list"]
    data: list[KeyRow]


class CreatedKey(KeyRow):
    key: str = Field(description="the secret, shown this once")


class UsageRow(BaseModel):
    key: str
    model: str
    requests: int


class UsageList(BaseModel):
    object: Literal["list"]
    data: list[UsageRow]
