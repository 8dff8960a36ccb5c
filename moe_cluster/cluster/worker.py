"""TrainWorker: the Ray actor that hosts one rank (an expert-parallel shard) of the job."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ..config import JobConfig, deepspeed_user_config
from ..interop.hf_mixtral import weights_loader
from ..train import Trainer


class TrainWorker:
    """One rank: process group membership, model shard, data shard, optimizer, checkpoints.

    The controller creates N of these in a placement group, asks rank 0 for a rendezvous
    address, calls ``setup`` on all, then ``run`` in chunks of steps.
    """

    def __init__(self, job: JobConfig, rank: int, world_size: int, checkpoint_dir: str):
        self.job, self.rank, self.world_size, self.checkpoint_dir = job, rank, world_size, checkpoint_dir
        self.trainer: Trainer | None = None
        self._store: dist.TCPStore | None = None  # rank 0 hosts the process group's store
        if not job.cluster.use_gpu:
            torch.set_num_threads(max(1, int(job.cluster.cpus_per_worker)))

    def pid(self) -> int:
        return os.getpid()

    def rendezvous_address(self, timeout_s: float) -> tuple[str, int]:
        """Start the process group's store on this node (rank 0 only); returns its address.

        The store listens from here on, on a port the OS picked, so no other process can take
        the port between this call and ``setup``.
        """
        import ray

        self._store = dist.TCPStore(
            "0.0.0.0", 0, self.world_size, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        return ray.util.get_node_ip_address(), self._store.port

    def setup(self, master_addr: str, master_port: int, checkpoint_path: str | None, timeout_s: float) -> int:
        """Join the process group, build the trainer, load ``checkpoint_path`` if given; returns the step."""
        use_gpu = self.job.cluster.use_gpu
        device = "cpu"
        if use_gpu:
            torch.cuda.set_device(0)  # Ray exposes the worker's one GPU as device 0
            device = "cuda"
        store = self._store or dist.TCPStore(
            master_addr, master_port, self.world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        dist.init_process_group(
            "nccl" if use_gpu else "gloo",
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            # A peer that stops answering fails the others' collectives after this long.
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        job = self.job  # assembled on the driver: init_from resolved, the DeepSpeed JSON merged in
        self.trainer = Trainer(
            job.model, job.trainer, job.data, ep=job.parallel.ep, checkpoint_dir=self.checkpoint_dir, device=device,
            deepspeed=deepspeed_user_config(job) if job.trainer.engine == "deepspeed" else None,
            init_weights=weights_loader(job.model.init_from) if job.model.init_from else None,
        )  # fmt: skip
        if checkpoint_path:
            self.trainer.resume(checkpoint_path)
        return self.trainer.step

    def run(self, num_steps: int) -> list[dict]:
        """Train ``num_steps`` steps; evaluate and checkpoint when due. Returns per-step metrics."""
        t, cfg = self.trainer, self.trainer.cfg
        out = []
        for _ in range(num_steps):
            m = t.train_step()
            if cfg.eval_every and (t.step % cfg.eval_every == 0 or t.step == cfg.max_steps):
                m["val_loss"] = t.evaluate()
            if cfg.checkpoint_every and (t.step % cfg.checkpoint_every == 0 or t.step == cfg.max_steps):
                t.save_checkpoint()
                m["checkpoint"] = True
            out.append(m)
        return out
