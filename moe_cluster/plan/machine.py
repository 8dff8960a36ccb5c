"""What one rank may use: the machine's and Ray's memory, probed here and nowhere else in the planner."""

from __future__ import annotations

import math
import os

from ..config import JobConfig

GB = 10**9  # decimal gigabytes, as GPU memory is sold ("80 GB") and as the docs quote plans


def memory_budget(cfg: JobConfig, cluster_resources: dict | None, here: bool) -> tuple[int | None, str]:
    """(bytes one rank may use, where that figure comes from).

    GPU workers: ``cluster.gpu_memory_gb``. CPU workers: ``cluster.memory_gb_per_worker``, else
    the node's memory over the workers placed on it: from ``cluster_resources`` (Ray's
    ``memory`` + ``object_store_memory``, the RAM it manages, over the nodes, nodes taken as
    alike), else, for a job that runs on this machine (``here``: the embedded local Ray), this
    machine's memory over ``cluster.num_workers``; otherwise unknown.
    """
    c = cfg.cluster
    if c.use_gpu:
        return int(c.gpu_memory_gb * GB), f"cluster.gpu_memory_gb={c.gpu_memory_gb:g}"
    if c.memory_gb_per_worker is not None:
        return int(c.memory_gb_per_worker * GB), f"cluster.memory_gb_per_worker={c.memory_gb_per_worker:g}"
    if cluster_resources is not None and cluster_resources.get("memory"):
        nodes = max(1, sum(1 for k in cluster_resources if k.startswith("node:") and k != "node:__internal_head__"))
        node_bytes = (cluster_resources["memory"] + cluster_resources.get("object_store_memory", 0)) / nodes
        per_node_cpu = cluster_resources.get("CPU", 0) / nodes
        if c.placement_strategy == "SPREAD":
            workers = math.ceil(c.num_workers / nodes)
        else:  # PACK fills a node's CPUs first
            workers = min(c.num_workers, max(math.ceil(c.num_workers / nodes), int(per_node_cpu // c.cpus_per_worker)))
        return int(node_bytes / workers), f"{node_bytes / GB:.1f} GB a node (Ray) over {workers} worker(s) on it"
    if here:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total / c.num_workers), f"this machine's {total / GB:.1f} GB over {c.num_workers} worker(s)"
    return None, "unknown (CPU workers on a cluster not reached yet; set cluster.memory_gb_per_worker to check)"


def runs_here(cfg: JobConfig) -> bool:
    """Whether the job's workers run on this machine: the embedded local Ray (no cluster.address,
    no RAY_ADDRESS to join)."""
    return cfg.cluster.address is None and not os.environ.get("RAY_ADDRESS")
