"""``moe-cluster plan``: memory per rank of the job the overrides make (moe_cluster.plan, docs/scaling.md)."""

from __future__ import annotations

import argparse

from .errors import CliError

ERROR_STATUS = 2  # a CliError here: the overrides are invalid (exit 3, from the command: it does not fit)


def _imbalance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"--load-imbalance must be a number >= 1 (1: perfectly even), got {text!r}")
    return value


def cmd_plan(args) -> int:
    """The memory plan of the job, as jobs/train.py composes and assembles it; exit 3 when it does not fit."""
    import json

    from ..config import assemble, compose, validate
    from ..plan import LOAD_IMBALANCE, format_plan, plan_job, runs_here, suggestions, to_json

    try:
        job = assemble(compose([o for o in args.overrides if o != "--"]))
        validate(job, files=False)  # the layout must make sense before it is planned
        here = runs_here(job)
        plan = plan_job(job, here=here, load_imbalance=args.load_imbalance or LOAD_IMBALANCE)
        fixes = [] if plan.fits else suggestions(job, plan, here=here)
    except Exception as exc:  # Hydra's own messages name the key and the options
        raise CliError(f"invalid job configuration: {exc}") from None
    if args.json:
        print(json.dumps({**to_json(plan), "suggestions": fixes}, indent=2))
    else:
        print(format_plan(plan))
        if fixes:
            print("what would change it (each re-planned):\n" + "\n".join(f"  {fix}" for fix in fixes))
    return 0 if plan.fits else 3


def add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="memory per rank of the job these overrides make, against its GPU or host memory (docs/scaling.md)",
        description="Print each rank's memory: parameters, gradients, optimizer state, activations at peak and "
                    "transient buffers, against cluster.gpu_memory_gb (GPU workers) or the host memory of a CPU worker. "
                    "Exit status 0: the job fits; 3: it does not; 2: the overrides are invalid.",
    )  # fmt: skip
    p.set_defaults(func=cmd_plan, error_status=ERROR_STATUS)
    p.add_argument("--json", action="store_true", help="print the same figures as one JSON object")
    p.add_argument("--load-imbalance", type=_imbalance, default=None, metavar="X",
                   help="rows a rank's experts get over the mean, allowed for with EP > 1 (default: 1.25)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for jobs/train.py")


COMMANDS = {"plan": add_plan}
