"""``python -m moe_cluster.cli``: the ``moe-cluster`` command."""

from . import main

raise SystemExit(main())
