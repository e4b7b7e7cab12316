"""One rank of a test job: `nested-reft train` through the real CLI, with a synthetic reward a tiny model can learn.

    python tests/dist_worker.py CONFIG.json

CONFIG: {"argv": [CLI arguments after `train`], "target_id": token id rewarded as the first completion token,
"stop_after": step after which every rank stops as if killed (optional), "fail_rank"/"fail_step": the rank whose
reward raises a UserError at that step, "hang_rank"/"hang_step"/"hang_s": the rank whose reward sleeps there}.
"""

import json
import sys
import time

import torch

torch.set_num_threads(1)


class Stop(Exception):
    """Every rank stops after `stop_after` steps (the on-disk state is what a killed job leaves)."""


def main() -> None:
    config = json.loads(open(sys.argv[1]).read())
    from nested_reft import distributed
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
                raise Stop

        return original(cfg, on_step=counted, reward_fn=reward, **kwargs)

    cli_train.run_training = run_training
    try:
        cli_main.main(["train", *config["argv"]])
    except Stop:
        sys.exit(0)


if __name__ == "__main__":
    main()
