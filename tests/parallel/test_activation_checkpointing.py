"""Activation checkpointing with expert parallelism (and FSDP) on 4 gloo ranks, ep=2.

One launch runs every mode with the balancing loss off and on, 3 optimizer steps each
(grad_accum=2, clipping active, expert bias on), on every rank:

- full and selective equal none on the same ranks (bitwise today; checked to 1e-6 relative):
  the recompute's all-to-alls and counts' all-reduce (full), or their kept outputs (selective),
  give back the forward's values;
- with the balancing loss off, every mode equals one process holding everything. (With
  accumulation the balancing loss is per micro-batch over the data-parallel ranks, so its
  micro-batches hold other sequences on one process than on four.) To 1e-6 relative on the
  first step; after an AdamW step to 1e-5: AdamW's first updates are about lr * sign(grad), so
  reduction-order noise in a near-zero gradient entry moves its parameter by up to lr, and the
  next gradients differ by a few 1e-6 (measured 4.5e-6 of the tensor's largest entry, with and
  without checkpointing alike).
"""

import pytest
import torch

from moe_cluster.train.launch import launch
from tests.parallel import ac_workers

MODES = ["none", "full", "selective"]
AUX = [0.0, 0.01]
EP = 2


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float, msg: str) -> None:
    # Relative to the tensor's largest entry: entries near zero have no relative precision.
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()) + 1e-12, msg=msg)


@pytest.fixture(scope="module")
def one_process():
    with ac_workers.one_thread():
        return ac_workers.run("none", aux_loss_coef=0.0)


def test_checkpointing_with_expert_parallel_and_fsdp(one_process):
    # 4 ranks, ep=2, FSDP (the default with more than one rank): the all-to-alls and FSDP's
    # gathers inside the recomputed blocks.
    results = launch(4, ac_workers.run_all, MODES, AUX, EP, True)
    for rank, res in enumerate(results):
        for mode in MODES:
            for aux in AUX:
                for step, (got, want) in enumerate(zip(res[mode, aux]["steps"], res["none", aux]["steps"])):
                    where = f"rank {rank} {mode} against none, aux_loss_coef {aux}, step {step}"
                    for key in ("loss", "aux_loss", "grad_norm"):
                        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=0), f"{where} {key}"
                    assert got["expert_counts"] == want["expert_counts"], where
                    assert got["grads"].keys() == want["grads"].keys(), where
                    for name, g in want["grads"].items():
                        torch.testing.assert_close(got["grads"][name], g, rtol=1e-6, atol=0, msg=f"{where} {name}")
            for step, (got, want) in enumerate(zip(res[mode, 0.0]["steps"], one_process["steps"])):
                where = f"rank {rank} {mode} against one process, step {step}"
                assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), where
                assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6), where
                assert got["grads"].keys() <= want["grads"].keys(), where  # this rank's experts
                for name, g in got["grads"].items():
                    assert_close_rel(g, want["grads"][name], 1e-6 if step == 0 else 1e-5, f"{where} {name}")
        # The EP collectives one micro-batch's backward runs: per MoE layer, the two all-to-alls
        # of the gradients; full adds the recompute's five (counts, rows out and back, two
        # all-reduces of counts), selective none: it kept their outputs.
        collectives = {mode: res[mode, 0.01]["backward_collectives"] for mode in MODES}
        layers = len(res["none", 0.01]["steps"][0]["expert_counts"])
        assert collectives == {"none": 2 * layers, "full": 7 * layers, "selective": 2 * layers}, rank
    # Between them the ranks hold every expert of every layer.
    held = set().union(*(res["none", 0.0]["steps"][0]["grads"].keys() for res in results))
    assert held == set(one_process["steps"][0]["grads"].keys())
