"""The job as its workers run it: the files it names read once, on the driver, and its layout.

``assemble`` fills in what the config leaves to files (``model.init_from``'s architecture, the
DeepSpeed JSON, the data's vocabulary); ``job_layout`` builds the one ``Layout`` that the
planner, the controller, the workers and the Trainer are given.
"""

from __future__ import annotations

import dataclasses

from ..data.config import DataConfig
from ..parallel.layout import Layout
from .schema import JobConfig


def job_layout(cfg: JobConfig) -> Layout:
    """The job's parallel layout (``cluster.num_workers``, ``parallel.ep``, ``trainer.grad_accum``,
    ``parallel.fsdp`` as ``trainer.engine`` resolves it): built once where the job is assembled,
    and passed as it is to the planner, the controller, the workers and the Trainer."""
    t = cfg.trainer
    return Layout.resolve(
        world=cfg.cluster.num_workers, ep=cfg.parallel.ep,
        num_experts=cfg.model.moe.num_experts, global_batch_size=t.global_batch_size, grad_accum=t.grad_accum,
        fsdp=cfg.parallel.fsdp, engine=t.engine,
    )  # fmt: skip


def deepspeed_user_config(cfg: JobConfig) -> dict:
    """The user's DeepSpeed keys: the ``deepspeed`` section merged over its ``config_path`` JSON."""
    from ..train.ds_config import user_config

    return user_config(cfg.deepspeed)


def assemble(cfg: JobConfig) -> JobConfig:
    """The job as the workers run it: files the config points at are read here, once, on the driver.

    ``model.init_from=hf:PATH``: PATH's config.json sets the architecture (the workers then load
    PATH's weights); ``trainer.engine=deepspeed``: the JSON at ``deepspeed.config_path`` is merged
    in (the workers may run on machines that do not have it); ``model.vocab_size=null`` (the
    default of ``data=bin``, conf/data/bin.yaml): the data's vocabulary, from its meta.json.
    """
    from ..interop.hf_mixtral import resolve_model_config

    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model))
    if cfg.model.vocab_size is None:
        try:
            vocab = data_vocab(cfg.data)["vocab_size"]
        except ValueError:
            vocab = None  # the data is not readable here (`moe-cluster plan` on a laptop): validate says why
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    if cfg.trainer.engine == "deepspeed":
        cfg = dataclasses.replace(cfg, deepspeed=deepspeed_user_config(cfg))
    return cfg


def data_vocab(d: DataConfig) -> dict:
    """The data's ``vocab_size`` (model.vocab_size's default) and ``max_token_id`` (what it must cover).

    Reads the prepared folders' meta.json (read_meta, read_mixture): a missing or incomplete
    folder, bad mixture weights or mixed tokenizers raise ValueError here.
    """
    if d.mixture and d.source != "bin":
        raise ValueError(f"data.mixture reads prepared folders: use data=bin (data.source={d.source!r})")
    if d.source == "stdlib":
        return {"vocab_size": 256, "max_token_id": 255}
    if d.source != "bin":
        raise ValueError(f"data.source={d.source!r} is unknown; use 'stdlib' or 'bin'")
    if d.mixture:
        if d.path:
            raise ValueError(f"set data.path or data.mixture, not both (data.path={d.path}); data.path=null")
        from ..data import read_mixture

        return read_mixture(d.mixture)
    if not d.path:
        raise ValueError(
            "data.source=bin needs data.path, the folder that `moe-cluster prepare` wrote, or "
            "data.mixture=[{path: A, weight: 0.7}, {path: B, weight: 0.3}]"
        )
    from ..data import read_meta

    return read_meta(d.path)
