"""The files behind image URLs: unguessable names, expiry, the size bound, and restarts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pagoda.server.image_store import ImageStore


def test_saved_images_are_found_by_their_name_only(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl_s=60)
    first, second = store.save([b"one"], "png")[0], store.save([b"two"], "webp")[0]
    assert first != second and first.endswith(".png") and second.endswith(".webp")
    assert len(first.removesuffix(".png")) == 43
    path, seconds_left = store.lookup(first)
    assert path.read_bytes() == b"one" and 59 < seconds_left <= 60
    assert store.lookup("A" * 43 + ".png") is None
    assert store.lookup("../" + first) is None
    assert not list(tmp_path.glob(".*.tmp"))


def test_images_expire(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl_s=0.3)
    (name,) = store.save([b"soon gone"], "png")
    assert store.lookup(name) is not None
    time.sleep(0.4)
    assert store.lookup(name) is None
    assert not (tmp_path / name).exists()


def test_the_oldest_go_past_the_size_bound(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl_s=60, max_bytes=25)
    names = [name for _ in range(4) for name in store.save([bytes(10)], "png")]
    assert [store.lookup(name) is not None for name in names] == [False, False, True, True]
    assert sorted(path.name for path in tmp_path.glob("[!.]*")) == sorted(names[2:])
    # an image larger than the bound is still kept until the next one arrives
    (big,) = store.save([bytes(100)], "png")
    assert store.lookup(big) is not None and store.lookup(names[3]) is None


def test_a_response_never_carries_an_evicted_url(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl_s=60, max_bytes=25)
    (old,) = store.save([bytes(10)], "png")
    response = store.save([bytes(10)] * 3, "png")  # 30 bytes: beyond the bound on its own
    assert all(store.lookup(name) is not None for name in response)
    assert store.lookup(old) is None


def test_a_restart_keeps_live_images_and_drops_expired_ones(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl_s=60)
    (live,), (old,) = store.save([b"live"], "png"), store.save([b"old"], "jpeg")
    stale = time.time() - 120
    os.utime(tmp_path / old, (stale, stale))
    (tmp_path / ".leftover.png.tmp").write_bytes(b"half written")
    (tmp_path / "notes.txt").write_text("not ours")
    store.close()
    again = ImageStore(tmp_path, ttl_s=60)
    assert again.lookup(live)[0].read_bytes() == b"live"
    assert again.lookup(old) is None and not (tmp_path / old).exists()
    assert not (tmp_path / ".leftover.png.tmp").exists()
    assert (tmp_path / "notes.txt").exists()


def test_one_server_owns_a_folder(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl_s=60)
    (name,) = store.save([b"mine"], "png")
    with pytest.raises(RuntimeError, match="in use by another pagoda server"):
        ImageStore(tmp_path, ttl_s=60, max_bytes=1)  # would have evicted the live image
    assert store.lookup(name) is not None
    store.close()
    ImageStore(tmp_path, ttl_s=60).close()


def test_a_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    """`--image-dir` naming a file ended the start-up in a FileExistsError traceback."""
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    for folder in (taken, taken / "images"):
        with pytest.raises(RuntimeError, match=f"cannot keep images in {folder}: "):
            ImageStore(folder, ttl_s=60)
