"""Step time of 1 against 2 data-parallel processes, and memory of full fine-tuning against LoRA (SmolLM2, CPU).

    OMP_NUM_THREADS=1 python benchmarks/data_parallel.py --out benchmarks/results/data_parallel.json

Runs the quickstart recipe (adaptive skipping) for `--steps` steps, back to back with the same settings:
1 process, 2 processes under torchrun (gloo), and 1 process with LoRA. Prints per-step times (the slowest rank's)
and peak RSS, and the exact parameter + gradient + AdamW-state bytes of full fine-tuning and of LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(name: str, nproc: int, sets: list[str], workdir: Path) -> list[dict]:
    out = workdir / name
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                "29517"] if nproc > 1 else [sys.executable]
    command = [*launcher, "-m", "nested_reft", "train", str(REPO / "recipes" / "quickstart.yaml"), "--overwrite",
               *[a for s in [*sets, f"run.output_dir={out}"] for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(command, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def state_bytes(lora: bool) -> dict[str, int]:
    """Exact bytes of parameters, gradients and AdamW state (two float32 moments per trainable parameter)."""
    from nested_reft import lora as lora_module
    from nested_reft.models import load_model
    from nested_reft.recipe import LoraSettings

    model, _ = load_model("smollm2-135m-instruct", device="cpu")
    if lora:
        lora_module.attach(model, LoraSettings(), "smollm2-135m-instruct")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"parameters": params, "trainable": trainable, "gradients": trainable, "adamw_state": 2 * trainable,
            "total": params + 3 * trainable}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--data", default="data/arithmetic-train.jsonl")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-data-parallel"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sets = [f"train.steps={args.steps}", f"rollout.max_completion_length={args.completion_length}",
            f"data.train={args.data}", "data.eval=null", "model.device=cpu", "train.save_every=1000",
            "train.log_rollouts_every=0"]
    results = {}
    for name, nproc, extra in (("1-process", 1, []), ("2-processes", 2, []),
                               ("1-process-lora", 1, ["model.lora={r: 16, alpha: 32}"])):
        rows = run(name, nproc, [*sets, *extra], args.workdir)
        results[name] = [{k: r[k] for k in ("step", "time_generate", "time_probe", "time_score", "time_train",
                                               "peak_memory_mb", "reward_mean", "skipped_layers")}
                         | {"step_seconds": r["time_generate"] + r["time_probe"] + r["time_score"] + r["time_train"]}
                         for r in rows]
        for r in results[name]:
            print(f"{name:16s} step {r['step']}: {r['step_seconds']:.1f} s (generate {r['time_generate']:.1f}, "
                  f"train {r['time_train']:.1f}), peak RSS {r['peak_memory_mb']:.0f} MiB, reward {r['reward_mean']:.3f}",
                  flush=True)
    results["state_bytes"] = {"full": state_bytes(False), "lora_r16_all_linear": state_bytes(True)}
    print(json.dumps(results["state_bytes"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
