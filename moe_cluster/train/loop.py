"""The step loop every rank runs, with or without Ray: step, then evaluate and checkpoint when due.

Written once for the Ray worker (``cluster/worker.py``, a chunk of steps per call) and
``train/local.py`` (every step to ``trainer.max_steps``), so that both evaluate and checkpoint at
the same steps: every ``eval_every`` / ``checkpoint_every`` steps and at ``max_steps``, whatever
its remainder. Evaluation and checkpoints are collective: every rank runs this loop alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trainer import Trainer


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether something done every ``every`` steps (0: never) is due after ``step``: on its
    multiples, and at the last step so that the run ends evaluated and checkpointed."""
    return bool(every) and (step % every == 0 or step == max_steps)


def steps(trainer: Trainer, num_steps: int, stepped: Callable[[], None] | None = None) -> Iterator[dict]:
    """Run ``num_steps`` optimizer steps; yield each step's metrics once its evaluation
    (``val_loss``) and checkpoint (``checkpoint: True``) are done, where due.

    ``stepped()``: called right after each optimizer step, before its evaluation and checkpoint
    (the worker's progress clock: when the trainer's step last advanced).
    """
    cfg = trainer.cfg
    for _ in range(num_steps):
        m = trainer.train_step()
        if stepped is not None:
            stepped()
        if due(trainer.step, cfg.eval_every, cfg.max_steps):
            m["val_loss"] = trainer.evaluate()
        if due(trainer.step, cfg.checkpoint_every, cfg.max_steps):
            trainer.save_checkpoint()
            m["checkpoint"] = True
        yield m
