"""Train an MoE language model on a Ray cluster.

    python jobs/train.py                                   # the embedded default: local Ray, 2 CPU workers
    python jobs/train.py model=small parallel.ep=4 cluster.num_workers=8 cluster.use_gpu=true
    python jobs/train.py run_dir=outputs/my-run resume=true    # continue a run whose driver died

Hydra composes conf/ with the overrides; the config is checked and converted to dataclasses once, here
(moe_cluster.config.to_job).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moe_cluster.cluster import JobFailed
from moe_cluster.cluster.launch import run_job
from moe_cluster.config import JobConfig, register_configs, to_job

register_configs()
CONF = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(config_path=CONF, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        job: JobConfig = to_job(cfg)  # refuses a key the schema lacks (a misspelt +key=value)
        if job.run_dir is None:
            job.run_dir = HydraConfig.get().runtime.output_dir
        summary = run_job(job)
    except (ValueError, JobFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"done: {summary['steps']} steps, {summary['failures']} failure(s) recovered")
    print(f"run directory: {summary['run_dir']}")
    print(f"checkpoints:   {summary['checkpoint_dir']} (latest {summary['last_checkpoint']})")


if __name__ == "__main__":
    main()
