"""python -m tests.dropout_worker --drop STAGE WORKER_FLAGS...

A real worker (the same process, servicer and protocol) that drops out of every secure-aggregation round at one
stage, as a Pi that loses power or its link would:
  train    after it has sent its shares: Train fails, so it never sends a masked update
  unmask   after its masked update is in the sum: SecAggUnmask fails, so it reveals no shares
"""

from __future__ import annotations

import sys

import grpc

from worker_service import __main__ as worker_main
from worker_service.servicer import WorkerServicer

STAGES = {"train": "Train", "unmask": "SecAggUnmask"}


def install(stage: str) -> None:
    async def dropped(self, request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker dropped out before {STAGES[stage]} (test)")

    setattr(WorkerServicer, STAGES[stage], dropped)


def main(argv: list[str]) -> int:
    if "--drop" not in argv or argv[argv.index("--drop") + 1] not in STAGES:
        sys.exit(__doc__)
    at = argv.index("--drop")
    install(argv[at + 1])
    return worker_main.main(argv[:at] + argv[at + 2 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
