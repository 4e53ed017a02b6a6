"""Logging for the server and its worker processes: one setup, text or one JSON object a line.

`setup_logging` runs in the server process and again in each spawned engine process (which is
handed the server's `LogSettings`), so that every line a deployment writes has one format:
the server's own, uvicorn's (its access log included) and the engines'.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PROBE_PATHS = frozenset(("/health", "/metrics"))
PROGRESS_INTERVAL_S = 10.0
ACCESS_LOGGER = "uvicorn.access"
# query parameters whose values the access log hides: a client that puts its key in the URL
# (`?api_key=`, `?token=`, Azure's `?api-key=`) must not find it in the logs
SECRET_QUERY = re.compile(
    r"([?&][^=&]*(?:key|token|secret|password|auth|sig)[^=&]*=)[^&]*", re.IGNORECASE
)

# diffusers' pipelines warn with the words a text encoder cut off a prompt (CLIP takes 77
# tokens of FLUX's prompts, which T5 takes whole): the warning stays, the words go
CUT_PROMPT_WARNING = "The following part of your input was truncated"

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str = "text"  # one of LOG_FORMATS
    level: str = "info"
    probe_requests: bool = False  # access-log lines of /health and /metrics


_current = LogSettings()


def current_settings() -> LogSettings:
    """What `setup_logging` was last given: the settings to hand to a spawned worker."""
    return _current


def setup_logging(settings: LogSettings, libraries: bool = True) -> None:
    """Route every log record of this process (libraries' included) to one stderr handler.
    `libraries=False` leaves transformers' own handler for `route_library_logs` to take over
    later: importing it takes 1-2 s, which a start that fails on its arguments need not pay."""
    global _current
    if settings.format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {settings.format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else _text_formatter())
    handler.addFilter(_hide_query_secrets)
    handler.addFilter(_hide_cut_prompt_words)
    if not settings.probe_requests:
        handler.addFilter(_not_a_probe)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.level.upper())
    logging.captureWarnings(True)
    if libraries:
        route_library_logs()
    _current = settings


def _text_formatter() -> logging.Formatter:
    # a worker's lines say which worker wrote them (its process is named after its model)
    worker = multiprocessing.parent_process() is not None
    middle = "%(processName)s %(name)s" if worker else "%(name)s"
    return logging.Formatter(f"%(asctime)s %(levelname)s {middle}: %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, process, message; the
    access log's fields apart; a traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        access = _access_fields(record)
        if access is not None:
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _access_fields(record: logging.LogRecord) -> dict | None:
    # uvicorn logs '%s - "%s %s HTTP/%s" %d' with (client, method, path, http version, status)
    if record.name != ACCESS_LOGGER or not isinstance(record.args, tuple):
        return None
    if len(record.args) != 5:
        return None
    client, method, path, _, status = record.args
    return {"client": client, "method": method, "path": path, "status": status}


def _hide_query_secrets(record: logging.LogRecord) -> bool:
    access = _access_fields(record)
    if access is not None and "?" in str(access["path"]):
        client, method, path, version, status = record.args
        path = SECRET_QUERY.sub(r"\1***", str(path))
        record.args = (client, method, path, version, status)
    return True


def _hide_cut_prompt_words(record: logging.LogRecord) -> bool:
    """Prompts are logged only with --log-requests."""
    if isinstance(record.msg, str) and record.msg.startswith(CUT_PROMPT_WARNING):
        why = record.getMessage().partition(" tokens: ")[0]
        record.msg, record.args = f"{why} tokens (the words cut are not logged)", ()
    return True


def _not_a_probe(record: logging.LogRecord) -> bool:
    access = _access_fields(record)
    return access is None or str(access["path"]).partition("?")[0] not in PROBE_PATHS


def route_library_logs() -> None:
    """transformers logs through a handler of its own; send its records to ours instead.
    Progress bars (downloads, shards) only where someone watches a terminal."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
        disable_progress_bars()


def route_diffusers_logs() -> None:
    """diffusers, like transformers, logs through a handler of its own (its own format, and
    progress bars into files): its records go to ours. An image worker calls this as it imports
    diffusers, which the server process never does."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_default_handler()
    diffusers_logging.enable_propagation()
    if not sys.stderr.isatty():
        diffusers_logging.disable_progress_bar()


def describe_error(exc: BaseException) -> str:
    """`Type: message` on one line: a start-up failure is one line of the log, whatever the
    library raising it wrapped into its message (transformers' run to five lines)."""
    lines = (line.strip() for line in str(exc).splitlines())
    return f"{type(exc).__name__}: {' '.join(line for line in lines if line)}"


def at_revision(commit: str | None) -> str:
    """` at revision <commit>` for weights from the hub (what an operator compares with the
    repository's history), nothing for a local folder: for the log line that names a model."""
    return f" at revision {commit}" if commit else ""


def progress(items: Iterable[T], desc: str, unit: str) -> Iterator[T]:
    """tqdm's bar on a terminal. Elsewhere (a log file, journald, `kubectl logs`), where a
    bar's carriage returns would glue lines together: a log line every PROGRESS_INTERVAL_S
    seconds and one at the end."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, unit=f" {unit}", leave=False, mininterval=1.0)
        return
    start = last = time.monotonic()
    count = 0
    for item in items:
        yield item
        count += 1
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL_S:
            logger.info("%s: %d %s so far (%.0f s)", desc, count, unit, now - start)
            last = now
    logger.info("%s: %d %s in %.1f s", desc, count, unit, time.monotonic() - start)
