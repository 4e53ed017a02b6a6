"""Host values of one step sent to the device in one copy, from a pinned staging buffer.

A step needs a handful of small integer and float arrays on the device (token ids, positions,
slots, block tables; sampling parameters). Sent one by one from pageable memory, each is a
blocking copy of its own; packed here into one pinned byte buffer, they leave in one
asynchronous copy, and the device side views that copy as int64 and float32 arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch


class HostToDevice:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.copied: torch.cuda.Event | None = None  # the last copy out of `buffer`
        self.sends = 0

    def send(
        self, ints: Sequence[Sequence[int]], floats: Sequence[Sequence[float]] = ()
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The arrays as int64 and float32 tensors on the device, in the order given."""
        self.sends += 1
        int_sizes, float_sizes = [len(a) for a in ints], [len(a) for a in floats]
        n_int, n_float = sum(int_sizes), sum(float_sizes)
        host_ints = torch.from_numpy(np.fromiter(chain.from_iterable(ints), np.int64, n_int))
        host_floats = torch.from_numpy(
            np.fromiter(chain.from_iterable(floats), np.float32, n_float)
        )
        if not self.pinned:  # the host is the device
            return list(host_ints.split(int_sizes)), list(host_floats.split(float_sizes))
        int_bytes, nbytes = 8 * n_int, 8 * n_int + 4 * n_float
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the buffer
        if self.buffer.numel() < nbytes:
            size = max(nbytes, 2 * self.buffer.numel(), 1 << 16)
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        self.buffer[:int_bytes].view(torch.int64).copy_(host_ints)
        self.buffer[int_bytes:nbytes].view(torch.float32).copy_(host_floats)
        on_device = self.buffer[:nbytes].to(self.device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        device_ints = on_device[:int_bytes].view(torch.int64).split(int_sizes)
        device_floats = on_device[int_bytes:].view(torch.float32).split(float_sizes)
        return list(device_ints), list(device_floats)
