"""`pagoda serve`'s parallelism flags, and the serve command of a node other than node 0
(it runs its tensor-parallel ranks and no HTTP server: node 0 serves)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pagoda.engine import distributed
from pagoda.engine.config import EngineConfig
from pagoda.server.engine_client import EngineClient
from pagoda.server.replicas import EngineReplicas

logger = logging.getLogger("pagoda")


def engine_client(config: EngineConfig, name: str, data_parallel_size: int):
    """One engine core for the model, or `data_parallel_size` replicas behind one client."""
    if data_parallel_size > 1:
        return EngineReplicas(config, name, data_parallel_size)
    return EngineClient(config, name)


def replicas_of(served: dict) -> Callable[[], dict[str, EngineReplicas]]:
    return lambda: {
        name: m.client for name, m in served.items() if isinstance(m.client, EngineReplicas)
    }


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
