"""Tensor parallelism's processes and process group (torch.distributed: NCCL on CUDA, gloo on
the CPU).

Rank 0 is the engine: it runs the scheduler and samples. Before each forward pass it sends the
step's model inputs to the other ranks in one broadcast (plain lists, over a gloo group even
beside NCCL), and every rank then runs the same forward pass on its shard of the weights
(engine/tensor_parallel.py). Node k of `nnodes` holds ranks k*L .. k*L+L-1 (L ranks a node);
rank 0 starts the other ranks of node 0, `run_node` those of another node. The group meets at
a TCP store that rank 0 serves at master_addr:master_port, as under torchrun.

The ranks fork from a forkserver (multiprocessing's, one per process that starts ranks) that
imported the engine once: each spawned rank imported torch, transformers and the engine itself
(5-6 s of CPU here, 8 ranks at once on a GPU node). The forkserver is a new interpreter, so no
CUDA context and no OpenMP pool is forked, and it takes the environment of the moment it
starts, at the first rank.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.util
import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from pagoda.engine.config import EngineConfig
from pagoda.engine.worker import (
    check_cuda_through_nvml,
    exit_with_server,
    keep_freed_memory,
    release_freed_memory,
)
from pagoda.logs import LogSettings, current_settings, setup_logging

logger = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.2
# the step channel waits as long as the engine idles: a server may see no request for days
IDLE_TIMEOUT = timedelta(days=365)
JOINED_KEY = "pagoda/joined"  # ranks other than 0 that reached the rendezvous store
JOIN_POLL_S = 0.05
RANK_IMPORTS = ["pagoda.engine.llm_engine"]  # what a rank runs: the forkserver imports it once


class RankDiedError(RuntimeError):
    """A rank of the engine's process group is gone: the engine cannot step any more."""


@dataclass(slots=True)
class Group:
    rank: int
    size: int
    local_rank: int
    control: dist.ProcessGroup  # gloo: step messages and small CPU values


_GROUP: Group | None = None


def world_size() -> int:
    return 1 if _GROUP is None else _GROUP.size


def rank() -> int:
    return 0 if _GROUP is None else _GROUP.rank


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` side by side along the last dimension."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_GROUP.size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)


def min_over_ranks(value: int) -> int:
    if _GROUP is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_GROUP.control)
    return int(t.item())


def rank_device(device: torch.device) -> torch.device:
    """Each rank of a node on its own GPU: the engine's device, then the next ones."""
    if _GROUP is None or device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + _GROUP.local_rank)


def ranks_per_node(config: EngineConfig) -> int:
    return config.tensor_parallel_size // config.nnodes


def cpu_threads_per_rank(config: EngineConfig) -> int:
    """On the CPU the ranks of a node share its cores: each gets its part."""
    return max(1, (os.cpu_count() or 1) // ranks_per_node(config))


def _init_group(
    config: EngineConfig,
    rank: int,
    local_rank: int,
    port: int,
    local_ranks: Sequence[multiprocessing.Process] = (),
) -> None:
    """Join the group; rank 0 watches `local_ranks` (those it started) while it waits."""
    global _GROUP
    device = config.resolve_device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device((device.index or 0) + local_rank)
    size = config.tensor_parallel_size
    timeout = timedelta(seconds=config.distributed_timeout_s)
    start = time.monotonic()
    try:
        store = _meet(config, rank, port, local_ranks)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    except RankDiedError:
        raise
    except Exception as exc:  # DistStoreError, DistNetworkError, RuntimeError, ValueError
        # "within N s" only when that is what happened: a port in use fails at once
        waited = time.monotonic() - start >= 0.9 * config.distributed_timeout_s
        within = f" within {config.distributed_timeout_s:g} s" if waited else ""
        raise RuntimeError(
            f"tensor parallelism: rank {rank} of {size} could not form the process group at "
            f"{config.master_addr}:{port}{within} (every rank must start, on {config.nnodes} "
            f"node(s), and reach that address): {_first_line(exc)}"
        ) from exc
    # The forward pass's collectives keep the join timeout; the step channel gets a gloo
    # group of its own that waits through idle time (and carries CPU objects beside NCCL).
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    _GROUP = Group(rank, size, local_rank, control)


def _meet(
    config: EngineConfig, rank: int, port: int, local_ranks: Sequence[multiprocessing.Process]
) -> dist.TCPStore:
    """The rendezvous store at master_addr:port (rank 0 serves it), once every rank reached
    it. Rank 0 waits here rather than in torch's rendezvous, so that a rank of its own that
    dies first (a script without the __main__ guard, a GPU it cannot use) fails the start at
    once instead of after the whole timeout."""
    size = config.tensor_parallel_size
    timeout = timedelta(seconds=config.distributed_timeout_s)
    if rank != 0:
        store = dist.TCPStore(config.master_addr, port, size, is_master=False, timeout=timeout)
        store.add(JOINED_KEY, 1)
        return store
    store = dist.TCPStore(
        config.master_addr, port, size, is_master=True, timeout=timeout, wait_for_workers=False
    )
    deadline = time.monotonic() + config.distributed_timeout_s
    while (joined := store.add(JOINED_KEY, 0)) < size - 1:
        if dead := next((p for p in local_ranks if not p.is_alive()), None):
            raise RankDiedError(
                f"tensor parallelism: {dead.name} exited (code {dead.exitcode}) before it "
                "joined the process group; its error is above. A script that starts "
                'tensor-parallel ranks needs the `if __name__ == "__main__":` guard'
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{joined + 1} of {size} ranks joined")
        time.sleep(JOIN_POLL_S)
    return store


def _first_line(exc: BaseException) -> str:
    """An error's message without the C++ frames torch's distributed errors may carry."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _destroy_group() -> None:
    global _GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_context() -> multiprocessing.context.ForkServerContext:
    """What the ranks start from: the forkserver, which imports RANK_IMPORTS when it starts."""
    check_cuda_through_nvml()  # before the forkserver starts: it imports the engine
    context = torch_mp.get_context("forkserver")
    context.set_forkserver_preload(RANK_IMPORTS)
    return context


def _start_ranks(config: EngineConfig, ranks: range, port: int) -> list[multiprocessing.Process]:
    context = rank_context()
    me = multiprocessing.current_process()
    # A server's engine core is itself a daemon process, which multiprocessing forbids to
    # have children; its ranks are watched (and end with it) by the code below instead.
    daemon = me._config.get("daemon", False)
    me._config["daemon"] = False
    try:
        processes = []
        for r in ranks:
            p = context.Process(
                target=run_follower,
                args=(config, r, r % ranks_per_node(config), port, current_settings()),
                name=f"pagoda-tp-rank{r}",
                daemon=True,
            )
            p.start()
            processes.append(p)
        return processes
    finally:
        me._config["daemon"] = daemon


class Leader:
    """Rank 0: starts node 0's other ranks, forms the group, sends each step's inputs."""

    def __init__(self, config: EngineConfig) -> None:
        port = config.master_port or _free_port()
        self.processes = _start_ranks(config, range(1, ranks_per_node(config)), port)
        # A process that exits joins its children after a SIGTERM each, which a server's ranks
        # ignore (they inherit it from the engine core: see engine/worker.py): an engine core
        # that ends otherwise than by close() (a failed step) would wait on them for good.
        # This runs first, at its exit.
        self._finalizer = multiprocessing.util.Finalize(
            None, _kill, args=(self.processes,), exitpriority=10
        )
        self.send_seconds = 0.0  # time in `send`, and bytes sent, over the engine's life
        self.send_bytes = 0
        self.num_sends = 0
        self.closing = False  # the ranks end because they were told to: not a fault
        try:
            _init_group(config, 0, 0, port, self.processes)
        except BaseException:
            self.close(stop=False)
            raise
        if config.serving:
            threading.Thread(target=self._watch, daemon=True, name="pagoda-tp-watch").start()

    def send(self, message: list | None) -> None:
        """One step's inputs (None: stop) to every other rank."""
        start = time.perf_counter()
        self.send_bytes += len(pickle.dumps(message))
        dist.broadcast_object_list([message], src=0, group=_GROUP.control)
        self.send_seconds += time.perf_counter() - start
        self.num_sends += 1

    def check_alive(self) -> None:
        dead = [p for p in self.processes if not p.is_alive()]
        if dead:
            raise RankDiedError(
                f"tensor-parallel {dead[0].name} exited (code {dead[0].exitcode}): the engine "
                "cannot step any more"
            )

    def _watch(self) -> None:
        # A collective waits for a dead rank until the group's timeout (forever on NCCL):
        # the engine core ends instead, and the server fails its requests.
        while not self.closing:
            try:
                self.check_alive()
            except RankDiedError as exc:
                if self.closing:
                    return
                logger.error("%s", exc)
                os._exit(1)
            time.sleep(WATCH_INTERVAL_S)

    def close(self, stop: bool = True) -> None:
        """Stop the ranks (those of other nodes too) and leave the group, so that another
        engine may form one after. `stop=False`: the engine failed to load, and the ranks may
        wait in a collective of the load rather than for a step: they are killed instead of
        being sent the stop (a message they would take for their collective's)."""
        self.closing = True
        if stop and _GROUP is not None and all(p.is_alive() for p in self.processes):
            try:
                self.send(None)
            except RuntimeError as exc:  # a rank of another node is gone
                logger.warning("tensor-parallel ranks did not all take the stop: %s", exc)
        for p in self.processes:
            p.join(5 if stop else 0)
        _kill(self.processes)
        self._finalizer.cancel()
        _destroy_group()


def _kill(processes: list[multiprocessing.Process]) -> None:
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()


def start_leader(config: EngineConfig) -> Leader | None:
    """Rank 0's Leader under tensor parallelism; None with one rank, or in a follower rank
    (whose group already exists)."""
    if config.tensor_parallel_size == 1:
        return None
    if _GROUP is not None:
        if _GROUP.rank == 0:
            raise ValueError("this process already runs a tensor-parallel engine: close() it first")
        return None
    if config.node_rank != 0:
        raise ValueError("node_rank > 0 runs ranks only (run_node), not an engine")
    return Leader(config)


def run_follower(
    config: EngineConfig, rank: int, local_rank: int, port: int, log_settings: LogSettings
) -> None:
    """A rank other than 0 (a process target): load its shard, then run what rank 0 sends."""
    from pagoda.engine.llm_engine import LLMEngine  # it imports this module

    # its parent's sentinel, not its pid read now: the parent may have ended already
    exit_with_server()
    setup_logging(log_settings)
    keep_freed_memory()
    try:
        _init_group(config, rank, local_rank, port)
        engine = LLMEngine(dataclasses.replace(config, skip_tokenizer_init=True))
    except Exception as exc:
        # one line through the logging setup, not multiprocessing's raw traceback on stderr:
        # rank 0 reports the failure in full (the same error, or the group that did not form)
        logger.error("rank %d failed to start: %s: %s", rank, type(exc).__name__, exc)
        sys.exit(1)
    release_freed_memory()
    try:
        while (inputs := _receive()) is not None:
            engine.runner.follow(inputs)
    except RuntimeError as exc:  # gloo: "Connection closed by peer"
        logger.error("rank %d: rank 0 or another rank is gone, stopping: %s", rank, exc)
        os._exit(1)
    _destroy_group()


def _receive() -> list | None:
    box: list = [None]
    dist.broadcast_object_list(box, src=0, group=_GROUP.control)
    return box[0]


def run_node(config: EngineConfig) -> int:
    """Node `config.node_rank` > 0: run its ranks until one ends; return its exit code."""
    first = config.node_rank * ranks_per_node(config)
    ranks = range(first, first + ranks_per_node(config))
    processes = _start_ranks(config, ranks, config.master_port)
    while all(p.is_alive() for p in processes):
        time.sleep(WATCH_INTERVAL_S)
    code = next(p.exitcode for p in processes if not p.is_alive())
    for p in processes:
        p.kill()
    return code
