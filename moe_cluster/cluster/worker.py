"""TrainWorker: the Ray actor that hosts one rank (an expert-parallel shard) of the job."""

from __future__ import annotations

import datetime
import gc
import os
import threading
import time
import traceback

import torch
import torch.distributed as dist

from ..config import JobConfig, deepspeed_user_config
from ..interop.hf_mixtral import weights_loader
from ..parallel.layout import Layout
from ..train import Trainer, loop
from . import network


class TrainWorker:
    """One rank: process group membership, model shard, data shard, optimizer, checkpoints.

    The controller creates N of these in a placement group, asks rank 0 for a rendezvous
    address, calls ``join`` on all, then ``run`` in chunks of steps. After a failure the
    survivors ``join`` a new group in place, their state restored from snapshots in memory.
    """

    def __init__(self, job: JobConfig, rank: int, world_size: int, checkpoint_dir: str):
        self.job, self.rank, self.world_size, self.checkpoint_dir = job, rank, world_size, checkpoint_dir
        self.trainer: Trainer | None = None
        self._progress_time = time.time()  # when the last step completed (or the actor started)
        self._store: dist.TCPStore | None = None  # the group's rank 0 hosts its store
        self._ward = None  # the neighbour's last committed snapshot, held in this node's object store
        if not job.cluster.use_gpu:
            torch.set_num_threads(max(1, int(job.cluster.cpus_per_worker)))

    def pid(self) -> int:
        return os.getpid()

    def progress(self) -> dict:
        """The last step this rank completed, and when. Answered while ``run`` is busy: the actor
        runs two calls at once (``max_concurrency=2``), so a silent rank is a stopped process, not
        a busy one."""
        trainer = self.trainer  # read once: a failing run sets it to None from another thread
        return {"rank": self.rank, "step": trainer.step if trainer else None, "time": self._progress_time}

    def node_id(self) -> str:
        """The Ray node this worker runs on (a rank's copy is kept on another node where there is one)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def rendezvous_address(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Start the process group's store on this node (the group's rank 0); returns its address.

        The store listens from here on, on a port the OS picked, so no other process can take
        the port between this call and ``join``.
        """
        import ray

        ip = ray.util.get_node_ip_address()
        # The store listens on the node's cluster address only (network.py), not on every interface.
        listener = network.listening_socket(ip)
        self._store = dist.TCPStore(
            ip, listener.getsockname()[1], world_size, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=listener.detach(),
        )  # fmt: skip
        return ip, self._store.port

    def join(
        self, master_addr: str, master_port: int, rank: int, layout: Layout, timeout_s: float,
        checkpoint_path: str | None = None, pieces: list | None = None,
    ) -> int:  # fmt: skip
        """Leave the current process group (if any) and form a new one as ``rank`` of ``layout``
        (the job's, or one a heal resized it to); build the trainer for it and load its state: from
        ``pieces`` (ObjectRefs of peers' snapshots, which merged hold every tensor this rank
        needs), else from ``checkpoint_path``, else fresh. Returns the step.
        """
        import ray

        self._close_groups()  # the model, optimizer and data are not touched until the restore below
        self.trainer = None
        use_gpu = self.job.cluster.use_gpu
        device = "cpu"
        if use_gpu:
            torch.cuda.set_device(0)  # Ray exposes the worker's one GPU as device 0
            device = "cuda"
        self.rank, self.world_size = rank, layout.world
        network.bind_collectives(ray.util.get_node_ip_address())  # the group listens on the node's address only
        if rank != 0:
            self._store = None  # hosted the store of an earlier group: that group is gone
        store = self._store if rank == 0 else dist.TCPStore(
            master_addr, master_port, self.world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
        )  # fmt: skip
        dist.init_process_group(
            "nccl" if use_gpu else "gloo",
            store=store,
            rank=rank,
            world_size=self.world_size,
            # A peer that stops answering fails the others' collectives after this long.
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        job = self.job  # assembled on the driver: init_from resolved, the DeepSpeed JSON merged in
        fresh = checkpoint_path is None and not pieces
        self.trainer = Trainer(
            job.model, job.trainer, job.data, layout, checkpoint_dir=self.checkpoint_dir, device=device,
            deepspeed=deepspeed_user_config(job) if job.trainer.engine == "deepspeed" else None,
            init_weights=weights_loader(job.model.init_from) if job.model.init_from and fresh else None,
        )  # fmt: skip
        if pieces:
            merged = {}
            for snapshot in ray.get(list(pieces)):
                merged.update(snapshot)
            self.trainer.restore(merged)
        elif checkpoint_path:
            self.trainer.resume(checkpoint_path)
        self._ward = None
        return self.trainer.step

    def run(self, num_steps: int, ward: list | None = None, snapshot: bool = True) -> tuple[list[dict], dict | None]:
        """Train ``num_steps`` steps; evaluate and checkpoint when due.

        Returns the per-step metrics and this rank's snapshot after the last step (call with
        ``num_returns=2``: the snapshot stays in Ray's object store, where the controller keeps it
        as this rank's copy until the next commit). ``ward``: the ObjectRefs of the neighbour's
        last committed state; they are fetched while this rank computes, and held, so that a copy
        lives on this rank's node too (the neighbour's node may be the one lost).
        """
        if ward:
            fetch = threading.Thread(target=self._hold, args=(list(ward),), daemon=True)
            fetch.start()
        out = []
        try:
            self._steps(num_steps, out)
        except Exception as exc:
            # A peer is gone (or this step failed). Close every connection of this rank's groups
            # now, so that the peers waiting on this rank in a collective fail at once rather than
            # at the group's timeout: a gloo group's sockets close only when the group is freed,
            # and the trainer (its layers hold the groups) and the failed step's frames hold it.
            # The trainer's state is dropped too: the controller restores a committed snapshot.
            exc.add_note(traceback.format_exc())
            exc.__traceback__ = None
            self._close_groups()
            self.trainer = None
            gc.collect()
            raise exc from None
        if ward:
            fetch.join()
        return out, (self.snapshot() if snapshot else None)

    def _steps(self, num_steps: int, out: list) -> None:
        def stepped() -> None:
            self._progress_time = time.time()

        for m in loop.steps(self.trainer, num_steps, stepped):
            m["world_size"] = self.world_size
            out.append(m)

    def _close_groups(self) -> None:
        """Abort this rank's process groups and leave them: their connections close at once (also
        to peers blocked in a collective with this rank, which then fail rather than wait for the
        timeout). Destroying alone would not close them while the trainer still holds the groups."""
        if not dist.is_initialized():
            return
        groups = self.trainer.groups if self.trainer is not None else None
        for pg in (groups.ep, groups.expert_dp, groups.world) if groups is not None else (dist.group.WORLD,):
            if pg is not None:
                try:
                    pg.abort()
                except Exception as exc:  # already aborted, or a torch whose gloo cannot abort
                    print(f"rank {self.rank}: aborting a process group failed ({exc}); peers may wait for its timeout")
        try:
            dist.destroy_process_group()
        except Exception as exc:  # never hide the error that brought us here
            print(f"rank {self.rank}: leaving the process group failed: {exc}")
        _release_meshes()

    def snapshot(self) -> dict:
        """This rank's state as NumPy views (Ray copies them into its object store on return)."""
        pieces = self.trainer.snapshot(copy=False)
        out = {k: v.numpy() for k, v in pieces.items() if k != "extra"}
        extra = dict(pieces["extra"])
        extra["rng"] = extra["rng"].numpy()
        out["extra"] = extra
        return out

    def _hold(self, refs: list) -> None:
        import ray

        self._ward = ray.get(refs)  # read-only views into this node's object store, pinned while held


def _release_meshes() -> None:
    """Let go of every device mesh of the groups just left, and so of the groups themselves.

    A gloo group's sockets close only when the group is freed, and a DeviceMesh holds its groups.
    DTensor keeps meshes in module-level caches (sharding propagation, redistribution plans), so
    under FSDP a failed rank kept its connections open and the peers blocked on it in a collective
    waited for the timeout (about 45 s per heal, measured, against about 1 s without FSDP). The
    caches are emptied, and a mesh still held elsewhere forgets its groups: they are destroyed,
    and a mesh of theirs must not be used again (a new group gets new meshes).
    """
    import functools

    from torch.distributed.device_mesh import DeviceMesh

    try:
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
    except ImportError:  # a torch without the planner cache
        clear_redistribute_planner_cache = None
    if clear_redistribute_planner_cache is not None:
        clear_redistribute_planner_cache()
    for obj in gc.get_objects():
        if isinstance(obj, functools._lru_cache_wrapper):
            if (getattr(obj, "__module__", None) or "").startswith("torch.distributed"):
                obj.cache_clear()
    gc.collect()
    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()
