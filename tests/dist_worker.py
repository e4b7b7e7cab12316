"""One rank of a test job: `nested-reft train` through the real CLI, with a synthetic reward a tiny model can learn.

    python tests/dist_worker.py CONFIG.json

CONFIG: {"argv": [CLI arguments after `train`], "target_id": token id rewarded as the first completion token,
"stop_after": step after which every rank stops as if killed (optional), "fail_rank"/"fail_step": the rank whose
reward raises a UserError at that step, "hang_rank"/"hang_step"/"hang_s": the rank whose reward sleeps there,
"slow_step"/"slow_token_s"/"marker": every rank's rollout of that step sleeps slow_token_s per decode step, and
touches MARKER.RANK (holding its pid) when it starts}. Each rank prints `rank R exit CODE` to stdout as it exits.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)


class Stop(Exception):
    """Every rank stops after `stop_after` steps (the on-disk state is what a killed job leaves)."""


def main() -> None:
    config = json.loads(open(sys.argv[1]).read())
    from nested_reft import decoding, distributed
    from nested_reft.cli import main as cli_main
    from nested_reft.cli import train as cli_train
    from nested_reft.errors import UserError

    rank = distributed.env_rank()
    step = {"n": 0}

    def reward(_text, ids, _example):
        if rank == config.get("fail_rank") and step["n"] + 1 == config.get("fail_step"):
            raise UserError(f"simulated failure on rank {rank}")
        if rank == config.get("hang_rank") and step["n"] + 1 == config.get("hang_step"):
            time.sleep(config["hang_s"])
        hit = bool(ids) and ids[0] == config.get("target_id", -1)
        return float(hit), hit

    original = cli_train.run_training

    def run_training(cfg, **kwargs):
        on_step = kwargs.pop("on_step", None)

        def counted(row):
            step["n"] = row["step"]
            if on_step:
                on_step(row)
            if row["step"] == config.get("stop_after"):
                # The product never lets a rank leave the group while rank 0 is still writing: both of its exits
                # (the end of training and a stop) pass a collective first. This simulated kill does the same, so
                # no rank tears gloo down under a peer that is mid-checkpoint (CI once saw a rank abort at exit,
                # "terminate called without an active exception", when it did not).
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()
                raise Stop

        return original(cfg, on_step=counted, reward_fn=reward, **kwargs)

    sample_tokens = decoding.sample_tokens

    def slow_sample_tokens(*args, **kwargs):
        if step["n"] + 1 == config.get("slow_step"):
            if config.get("marker"):
                Path(f"{config['marker']}.{rank}").write_text(str(os.getpid()))
            time.sleep(config["slow_token_s"])
        return sample_tokens(*args, **kwargs)

    cli_train.run_training = run_training
    decoding.sample_tokens = slow_sample_tokens
    try:
        cli_main.main(["train", *config["argv"]])
    except Stop:
        sys.exit(0)
    except SystemExit as exc:
        print(f"rank {rank} exit {exc.code}", flush=True)
        raise


if __name__ == "__main__":
    main()
