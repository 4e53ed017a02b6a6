"""`pagoda serve`'s parallelism flags, and the serve command of a node other than node 0
(it runs its tensor-parallel ranks and no HTTP server: node 0 serves)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from pagoda.engine import distributed
from pagoda.engine.config import EngineConfig
from pagoda.server.engine_client import EngineClient
from pagoda.server.replicas import EngineReplicas

logger = logging.getLogger("pagoda")


def check_args(args: argparse.Namespace) -> None:
    if args.data_parallel_size > 1 and (args.nnodes or 1) > 1:
        raise ValueError(
            "--data-parallel-size runs its replicas on one machine: --nnodes must be 1 with it"
        )
    several_nodes = (args.nnodes or 1) > 1 or args.master_port is not None
    if several_nodes and not args.model:
        raise ValueError("--nnodes and --master-port serve one model: give it with --model")


def engine_client(config: EngineConfig, name: str, data_parallel_size: int):
    """One engine core for the model, or `data_parallel_size` replicas behind one client."""
    if data_parallel_size > 1:
        return EngineReplicas(config, name, data_parallel_size)
    return EngineClient(config, name)


def replicas_of(served: dict) -> Callable[[], dict[str, EngineReplicas]]:
    return lambda: {
        name: m.client for name, m in served.items() if isinstance(m.client, EngineReplicas)
    }


def is_rank_node(args: argparse.Namespace) -> bool:
    return (args.node_rank or 0) > 0


def serve_ranks(config: EngineConfig) -> int:
    """Run this node's ranks of the model until one ends; the exit code."""
    first = config.node_rank * distributed.ranks_per_node(config)
    logger.info(
        "node %d of %d: ranks %d-%d of %s, meeting at %s:%s",
        config.node_rank,
        config.nnodes,
        first,
        first + distributed.ranks_per_node(config) - 1,
        config.model,
        config.master_addr,
        config.master_port,
    )
    return distributed.run_node(config)
