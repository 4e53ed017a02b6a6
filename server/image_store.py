"""Generated images behind `response_format: url`: files under a bounded cache folder, each
named by an unguessable id, readable without the API key (as OpenAI's signed URLs are) until
they expire. Past the size bound the oldest files go first, never those of the response being
written. One server owns a folder (a lock held while it runs): two that shared one would evict
each other's live images by their own bounds."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from pagoda.cache import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 3600.0
DEFAULT_MAX_BYTES = 1 << 30
URL_PATH = "/v1/images/files/"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# 32 random bytes in URL-safe base64 (43 characters) and the format
_NAME = re.compile(r"[A-Za-z0-9_-]{43}\.(png|jpeg|webp)")


def default_folder() -> Path:
    return cache_dir() / "images"


@dataclass(slots=True)
class StoredImage:
    created: float  # wall-clock seconds (file mtimes survive a restart)
    size: int


class ImageStore:
    def __init__(
        self,
        folder: Path | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()
        try:  # at start-up: one line naming the folder, not a traceback
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _own(self.folder)
        except OSError as exc:
            raise RuntimeError(
                f"cannot keep images in {self.folder}: {exc.strerror or exc}"
            ) from None
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._files: OrderedDict[str, StoredImage] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()  # saves run in threads
        self._scan()

    def save(self, images: list[bytes], output_format: str) -> list[str]:
        """Write a response's images; their file names (the ids in their URLs). None of them
        is evicted to make room for another: a response never carries a dead URL."""
        names = [f"{secrets.token_urlsafe(32)}.{output_format}" for _ in images]
        for name, data in zip(names, images):
            temporary = self.folder / f".{name}.tmp"
            temporary.write_bytes(data)
            temporary.replace(self.folder / name)
        with self._lock:
            for name, data in zip(names, images):
                self._files[name] = StoredImage(time.time(), len(data))
                self._bytes += len(data)
            self._evict(keep=set(names))
        if sum(map(len, images)) > self.max_bytes:
            logger.warning(
                "a response's %d images (%d bytes) exceed --image-cache-bytes (%d): kept until "
                "the next images come",
                len(images),
                sum(map(len, images)),
                self.max_bytes,
            )
        return names

    def close(self) -> None:
        """Give the folder up (the process's end does too)."""
        os.close(self._lock_fd)

    def lookup(self, name: str) -> tuple[Path, float] | None:
        """The file of a live image and its seconds left, or None (unknown or expired)."""
        with self._lock:
            stored = self._files.get(name) if _NAME.fullmatch(name) else None
            if stored is None:
                return None
            left = stored.created + self.ttl_s - time.time()
            if left <= 0:
                self._remove(name)
                return None
        return self.folder / name, left

    def _scan(self) -> None:
        """Adopt the live images a previous run left (their URLs stay valid until expiry)."""
        found = []
        for path in self.folder.iterdir():
            if _NAME.fullmatch(path.name):
                stat = path.stat()
                found.append((stat.st_mtime, path.name, stat.st_size))
            elif path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        for created, name, size in sorted(found):
            self._files[name] = StoredImage(created, size)
            self._bytes += size
        with self._lock:
            self._evict(keep=set())

    def _evict(self, keep: set[str]) -> None:
        """Drop expired images, then the oldest while over the size bound, up to the first of
        `keep` (the newest)."""
        deadline = time.time() - self.ttl_s
        for name, stored in list(self._files.items()):
            expired = stored.created <= deadline
            if name in keep or not (expired or self._bytes > self.max_bytes):
                break
            self._remove(name)

    def _remove(self, name: str) -> None:
        stored = self._files.pop(name)
        self._bytes -= stored.size
        (self.folder / name).unlink(missing_ok=True)


def _own(folder: Path) -> int:
    """Lock the folder for this process, or fail at start-up naming the way out."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"the image folder {folder} is in use by another pagoda server: give each server "
            "its own --image-dir"
        ) from None
    return fd
