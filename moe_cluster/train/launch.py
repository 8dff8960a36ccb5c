"""Run a function on N local processes joined in one torch.distributed group (gloo on CPU).

    launch(2, my_fn, arg)   # runs my_fn(arg) on ranks 0 and 1, returns their results in rank order

The Ray service starts its ranks as actors instead; this launcher serves tests, single-machine
runs and ``python -m moe_cluster.train.local``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, result_dir: str, fn, args, threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, os.path.join(result_dir, f"rank{rank}.pt"))
        # Every rank done before any leaves: rank 0 hosts the store, and a gloo group torn down
        # while a peer is still in its last collective aborted a rank at exit (SIGABRT, "terminate
        # called without an active exception"; seen once in a CI run). Not on failure: it would hang.
        dist.barrier()
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(result_dir, f"rank{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


def launch(world_size: int, fn, *args, threads_per_rank: int | None = None) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return each rank's result, rank order.

    ``fn`` must be importable (a module-level function) and return tensors, numbers, strings and
    plain containers of them. An exception on any rank is raised here with that rank's traceback.
    """
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory() as result_dir:
        try:
            mp.start_processes(
                _entry,
                args=(world_size, free_port(), result_dir, fn, args, threads),
                nprocs=world_size,
                start_method="spawn",
            )
        except mp.ProcessRaisedException as exc:
            raise RuntimeError(f"a rank failed:\n{exc}") from None
        results = []
        for rank in range(world_size):
            # weights_only: results are tensors and plain containers of numbers and strings; no pickle runs code.
            out = torch.load(os.path.join(result_dir, f"rank{rank}.pt"), weights_only=True)
            if not out["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{out['error']}")
            results.append(out["result"])
        return results
