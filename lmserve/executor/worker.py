"""A tensor-parallel rank other than 0, in its own process: `python -m lmserve.executor.worker`.

It loads its slices of the model and its KV heads, then runs every step rank 0 sends it, in
lockstep with rank 0 (they meet in each layer's collectives). It samples nothing: rank 0 does,
and sends the tokens with the next step. It exits when told to, when rank 0's process is gone,
or on any error (rank 0 then sees its collectives fail and stops the engine).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle

import zmq

from lmserve.config import EngineConfig
from lmserve.executor.group import Step, Stop, join_group

logger = logging.getLogger("lmserve.executor.worker")

_PARENT_POLL_MS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description="One tensor-parallel rank (started by the engine)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--store", required=True, help="the ranks' rendezvous file")
    parser.add_argument("--shm", required=True, help="the ranks' shared-memory file")
    parser.add_argument("--steps", required=True, help="ZMQ address rank 0 sends steps on")
    parser.add_argument("--replies", required=True, help="ZMQ address to report ready on")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank {args.rank} %(levelname)s %(message)s"
    )
    parent = os.getppid()
    ctx = zmq.Context()
    steps = ctx.socket(zmq.PULL)
    steps.connect(args.steps)
    replies = ctx.socket(zmq.PUSH)
    replies.connect(args.replies)
    try:
        config: EngineConfig = pickle.loads(steps.recv())
        # rank 0 is the parent; when any other rank dies, rank 0 stops and so takes this one
        tp = join_group(
            args.rank,
            args.size,
            args.store,
            args.shm,
            config.device,
            alive=lambda: os.getppid() == parent,
        )
        from lmserve.worker.model_runner import ModelRunner

        runner = ModelRunner.load(config, tp)
        replies.send(pickle.dumps(args.rank))
        while True:
            if not steps.poll(_PARENT_POLL_MS):
                if os.getppid() != parent:
                    logger.warning("the engine core is gone; this rank exits")
                    return
                continue
            message = pickle.loads(steps.recv())
            if isinstance(message, Stop):
                return
            assert isinstance(message, Step)
            runner.extend_tokens(message.sampled)
            if message.batch_state is not None and runner.batch_state() != message.batch_state:
                raise RuntimeError(f"rank {args.rank}'s batch is out of step with rank 0's")
            runner.execute(message.scheduler_output)
            runner.sample()
    finally:
        steps.close(linger=0)
        replies.close(linger=1000)
        ctx.term()


if __name__ == "__main__":
    main()
