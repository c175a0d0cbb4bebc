"""Serve deployment `train-wflw/<name>` from this checkout until interrupted (`make serve`).

    PREFECT_API_URL=http://127.0.0.1:4200/api python flows/serve.py --name local

then, from anywhere that reaches the same Prefect server:

    prefect deployment run 'train-wflw/local' --param overrides='{"train.epochs": 3}' --watch

Runs of the deployment queue (collision strategy ENQUEUE) rather than run side by side; the flow also holds
a concurrency limit on the workspace, which covers runs of other deployments of the same checkout.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from train_wflw import train_wflw


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default="local", help="deployment name (default: local)")
    parser.add_argument("--cron", help='also run on this schedule, e.g. "0 3 * * *" (nightly at 3:00)')
    args = parser.parse_args(argv)
    train_wflw.serve(
        name=args.name,
        cron=args.cron,
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=["wflw"],
    )


if __name__ == "__main__":
    main()
