"""vLLM's runtime LoRA updating: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

An adapter loads into a free slot of its base model's engine (every replica's), which the
operator leaves with `engine.max_loras` above the entry's `lora_modules`; from then on it is a
model of its own, as one from the catalog is. These routes read files on the server and
change what it serves, so a managed key (`pagoda keys`) may not call them: only the
server's static `--api-key` may, or anyone on a server without keys (as in vLLM, whose
switch is VLLM_ALLOW_RUNTIME_LORA_UPDATING).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from pagoda.server.errors import APIError, invalid
from pagoda.server.generation import ServedModel
from pagoda.server.keys.meter import request_meter
from pagoda.server.lora import adapter_folder
from pagoda.server.protocol import parse_body
from pagoda.server.worker_client import RequestRejected


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)
    base_model_name: str | None = None  # default: the one model with a free adapter slot
    load_inplace: bool = False  # vLLM's: replace the adapter of that name


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's adapter number: accepted, the name is the key


def lora_routes(
    models: dict[str, ServedModel], adapters: dict[str, ServedModel], named: dict
) -> list[Route]:
    """`adapters` and `named` (every id a request may name) are the app's own: a load or an
    unload changes what its routes serve."""
    changing = asyncio.Lock()  # one load or unload at a time: each checks, then awaits
    # the models whose engines started with slots left for adapters loaded at run time
    takers = [
        model
        for model in models.values()
        if model.kind == "chat"
        and model.client.info.get("max_loras", 0) > len(model.client.info.get("lora_modules", {}))
    ]

    async def load(request: Request) -> PlainTextResponse:
        _check_caller(request)
        req = parse_body(LoadLoraAdapterRequest, await request.body())
        async with changing:
            return await _load(req)

    async def _load(req: LoadLoraAdapterRequest) -> PlainTextResponse:
        name = req.lora_name
        if name in adapters and not req.load_inplace:
            raise invalid(f"The LoRA adapter '{name}' has already been loaded.", "lora_name")
        if name in models:
            raise invalid(f"'{name}' is the id of a served model.", "lora_name")
        base = models[adapters[name].parent] if name in adapters else _base(models, takers, req)
        local = Path(req.lora_path).expanduser()
        source = str(local.resolve()) if local.exists() else req.lora_path
        try:
            folder = await asyncio.to_thread(adapter_folder, source, None)
        except ValueError as exc:
            raise invalid(f"lora_path: {exc}", "lora_path") from None
        if name in adapters:  # load_inplace: out first, then in again
            await _unload(models, adapters, named, name)
        try:
            await base.client.load_lora(name, folder)
        except RequestRejected as exc:  # no free slot, or an adapter the engine cannot apply
            raise invalid(str(exc)) from None
        adapter = base.adapter(name, source)
        base.adapters.append(adapter)
        adapters[name] = named[name] = adapter
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(request: Request) -> PlainTextResponse:
        _check_caller(request)
        req = parse_body(UnloadLoraAdapterRequest, await request.body())
        async with changing:
            if req.lora_name not in adapters:
                raise APIError(
                    404, f"The LoRA adapter '{req.lora_name}' cannot be found.", param="lora_name"
                )
            await _unload(models, adapters, named, req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return [
        Route("/v1/load_lora_adapter", load, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
    ]


def _check_caller(request: Request) -> None:
    if request_meter(request).key is not None:
        raise APIError(
            403,
            "Loading and unloading LoRA adapters needs the server's --api-key, not a key "
            "from `pagoda keys`.",
            code="permission_denied",
        )


def _base(
    models: dict[str, ServedModel], takers: list[ServedModel], req: LoadLoraAdapterRequest
) -> ServedModel:
    """The model to load onto: the one named, else the one that takes adapters."""
    if req.base_model_name is not None:
        model = models.get(req.base_model_name)
        if model is None or model.kind != "chat":
            raise invalid(f"'{req.base_model_name}' is not a served chat model.", "base_model_name")
        return model
    if len(takers) == 1:
        return takers[0]
    if not takers:
        raise invalid(
            "No served model takes LoRA adapters at run time: give its catalog entry "
            "engine.max_loras above its lora_modules (pagoda serve --max-loras).",
            "lora_name",
        )
    names = ", ".join(m.id for m in takers)
    raise invalid(
        f"Name the base model (base_model_name): {names} take adapters.", "base_model_name"
    )


async def _unload(
    models: dict[str, ServedModel], adapters: dict[str, ServedModel], named: dict, name: str
) -> None:
    base = models[adapters[name].parent]
    await base.client.unload_lora(name)
    base.adapters = [a for a in base.adapters if a.id != name]
    del adapters[name], named[name]
