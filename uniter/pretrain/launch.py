"""Entry point of one pretraining worker under a launcher: `torchrun … -m uniter.pretrain.launch JOB`
or `deepspeed --module uniter.pretrain.launch JOB`. The launcher sets RANK, LOCAL_RANK, WORLD_SIZE
and MASTER_ADDR/PORT; JOB is the job file the pretrain stage wrote (storage, artifact key, inputs,
config), so processes on other nodes find the same corpus and checkpoints."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from uniter.pretrain.stage import PretrainJob, train_process


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", type=Path, help="the job file written by the pretrain stage")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    args = ap.parse_args()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        sys.exit(
            f"uniter.pretrain.launch: {', '.join(missing)} not set: run it under torchrun or deepspeed, "
            "or use `uniter run pretrain` (which starts the workers itself)"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank if args.local_rank is not None else rank))
    train_process(rank, world, PretrainJob.from_json(args.job.read_text()), local_rank=local_rank)


if __name__ == "__main__":
    main()
