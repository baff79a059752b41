"""``python -m keyrotor.worker.cli``: the ``keyrotor`` console script, for an environment whose
``bin/`` is not on PATH."""

from __future__ import annotations

from keyrotor.worker.cli import main

main()
