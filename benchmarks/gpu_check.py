"""One-shot GPU check of the rollout engine, the shipped update and a short real training run, with no network.

The model is randomly initialised from Qwen2.5-1.5B's configuration, written below (no download). Random weights
give meaningless text but the same work per token as the trained model. The rollout sections use it in pure
bf16 with fixed-length rollouts (min_new_tokens = max_new_tokens); `update` and `train` run the shipped GPU
recipe (recipes/gpu/qwen2.5-math-1.5b-gsm8k.yaml: float32 master weights, bf16 compute with a float32 LM head,
gradient checkpointing, random skipping of 10-25% of the layers). Sections, each timed, each recorded even if
another fails:

  throughput   tokens/s at batch 64 x 512 new tokens: model.generate, our engine with the dynamic cache, the
               static cache eagerly, the static cache with CUDA graphs; interleaved repeats, medians
  graphs       capture time, graph count and the memory the graphs' pool took
  nested       speedup of the graph engine with 25% and 40% of the layers skipped over the full model, and
               efficiency = speedup / (L / (L - k))
  roofline     decode bytes per step (weights of the kept layers + final norm + LM head, plus the KV cache
               the step needs) / step time / the device's peak HBM bandwidth
  profile      torch.profiler on one decode step, eager and graph-replayed: top kernels, launch counts
  update       the shipped `update.optimise` with `precision.MasterWeights` on one real scored batch (8 prompts
               x 8 completions x 512 tokens sampled by the skipped model, rewarded by first-token parity):
               step time and peak memory, timed after a warm-up step
  train        `trainer.train` on the model saved as a folder with a byte-level tokenizer: 3 steps of 8 prompts
               x 8 completions x up to 256 tokens with the dynamic cache, 3 with the static cache (CUDA graphs
               auto), then the static run resumed for a 4th step: step times, peak memory, rewards
  compiled     the graph engine with torch.compile'd layer units (`rollout.compile`; last, as compiling is slow
               and may fail): tokens/s against plain graphs, compile + capture time, roofline fraction

`update` and `train` live in gpu_check_training.py. `--smoke` runs the same code on CPU with a tiny model and toy
sizes in seconds (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch.autograd import DeviceType
from transformers import AutoModelForCausalLM, Qwen2Config

from gpu_check_training import synced, train_runs, update_step  # the sibling file: this runs as a script
from nested_reft.decoding import decode
from nested_reft.devices import use_tf32
from nested_reft.rollout import generate, left_pad
from nested_reft.sampling import SamplingParams
from nested_reft.skipping import SkipSampler
from nested_reft.static_engine import StaticEngine, engine_for

# Qwen2.5-1.5B (config.json of the hub checkpoint), restated so that nothing is downloaded.
QWEN25_15B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False, sliding_window=131072,
    max_window_layers=21, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151643,
)
TINY = dict(QWEN25_15B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, sliding_window=4096,
            bos_token_id=1, eos_token_id=2)

# Peak HBM bandwidth in bytes/s by device-name fragment (vendor datasheets); first match wins.
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H800", 3.35e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
                  ("L40S", 0.864e12)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, toy sizes: checks the script runs")
    parser.add_argument("--out", default="gpu_check.json", help="JSON report path")
    parser.add_argument("--peak-bandwidth-tbs", type=float, default=None,
                        help="device peak HBM bandwidth in TB/s (default: looked up from the device name)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per configuration")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that start after this")
    args = parser.parse_args()
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --smoke for the CPU dry run)")
    sizes = dict(
        prompts=2 if smoke else 16, generations=2 if smoke else 4, prompt_len=(6, 10) if smoke else (96, 128),
        new_tokens=8 if smoke else 512, repeats=args.repeats or (1 if smoke else 2), ratios=(0.25, 0.4),
        # update and train: the shipped recipe (its micro-batch, log-prob chunks, precision) at these sizes
        train_prompts=2 if smoke else 8, train_generations=4 if smoke else 8, train_prompt_words=3 if smoke else 32,
        update_completion_len=16 if smoke else 512, train_completion_len=8 if smoke else 256, train_steps=3,
    )
    if smoke:
        torch.set_num_threads(1)
    report: dict[str, Any] = {"smoke": smoke, "sizes": {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in sizes.items()}}
    started = time.perf_counter()

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if time.perf_counter() - started > args.budget_s:
            report[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            print(f"[{name}] skipped: time budget spent", flush=True)
            return
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # a failing section must not lose the others' results
            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[name]["section_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] {json.dumps(report[name], default=str)}", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))  # partial results survive a crash

    section("environment", lambda: environment(device, args.peak_bandwidth_tbs, smoke))
    use_tf32(device)  # as `load_model` sets it for every command: the models here are built from a config
    config = Qwen2Config(**(TINY if smoke else QWEN25_15B))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    prompts = random_prompts(sizes["prompts"], sizes["prompt_len"], config.vocab_size)
    work = Work(model, prompts, sizes)
    section("throughput", work.throughput)
    section("graphs", work.graph_stats)
    section("nested", work.nested)
    section("roofline", lambda: work.roofline(report["environment"].get("peak_bandwidth_bytes_s")))
    section("profile", work.profile)
    train_prompts = random_prompts(sizes["train_prompts"], sizes["prompt_len"], config.vocab_size)
    section("update", lambda: update_step(config, sizes, device, train_prompts))
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder:  # up to ~40 GB at full size
        section("train", lambda: train_runs(config, sizes, device, Path(folder)))
    section("compiled", lambda: work.compiled(report["environment"].get("peak_bandwidth_bytes_s")))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out} ({report['total_seconds']} s)")
    summarise(report)


def environment(device: torch.device, override_tbs: float | None, smoke: bool) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = override_tbs * 1e12 if override_tbs else next((b for key, b in PEAK_BANDWIDTH if key in name), None)
    if smoke and peak is None:
        peak = 1e11  # a nominal figure so that the roofline arithmetic runs; meaningless on CPU
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "peak_bandwidth_bytes_s": peak,
            "peak_bandwidth_source": "override" if override_tbs else ("nominal (smoke)" if smoke and not
                                                                        override_tbs else "device-name table")}


def random_prompts(count: int, lengths: tuple[int, int], vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    low, high = lengths
    return [torch.randint(3, vocab, (int(torch.randint(low, high + 1, (1,), generator=generator)),),
                          generator=generator).tolist() for _ in range(count)]


class Work:
    """The rollout measurements, sharing one model, one prompt set and the runs' results."""

    def __init__(self, model, prompts: list[list[int]], sizes: dict[str, Any]) -> None:
        self.model, self.prompts, self.sizes = model, prompts, sizes
        self.device = next(model.parameters()).device
        self.num_layers = model.config.num_hidden_layers
        self.params = SamplingParams(temperature=1.0)
        self.tokens = sizes["new_tokens"]
        self.common = dict(num_generations=sizes["generations"], max_new_tokens=self.tokens,
                           min_new_tokens=self.tokens, params=self.params, eos_token_ids=[model.config.eos_token_id],
                           pad_token_id=0)
        self.ids, self.mask = left_pad(prompts, sizes["generations"], 0, self.device)
        self.full_graph_runs: list[Any] = []  # Rollouts of the graph engine, full model (roofline input)

    def ours(self, kv_cache: str, cuda_graphs: str, skip: tuple[int, ...] = (), seed: int = 0,
             compile_layers: bool = False):
        start = time.perf_counter()
        rollout = generate(self.model, self.prompts, skip=skip, seed=seed, kv_cache=kv_cache,
                           cuda_graphs=cuda_graphs, compile_layers=compile_layers, **self.common)
        seconds = synced(start, self.device)
        assert rollout.tokens_generated == self.ids.shape[0] * self.tokens
        return rollout, rollout.tokens_generated / seconds

    def hf_generate(self, seed: int) -> float:
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = self.model.generate(
            input_ids=self.ids, attention_mask=self.mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=self.tokens, min_new_tokens=self.tokens, pad_token_id=0,
            eos_token_id=self.model.config.eos_token_id,
        )
        seconds = synced(start, self.device)
        assert out.shape[1] - self.ids.shape[1] == self.tokens
        return self.ids.shape[0] * self.tokens / seconds

    def throughput(self) -> dict[str, Any]:
        configurations = {
            "model.generate": lambda seed: self.hf_generate(seed),
            "ours dynamic": lambda seed: self.ours("dynamic", "off", seed=seed)[1],
            "ours static eager": lambda seed: self.ours("static", "off", seed=seed)[1],
            "ours static auto": lambda seed: self.graph_full(seed),  # CUDA graphs on a GPU
        }
        # Warm-ups, not timed: CUDA/cuBLAS initialisation, allocator growth, and for "static auto" the engine's
        # construction and graph capture (timed separately, reported with the graph stats).
        short = dict(self.common, max_new_tokens=4, min_new_tokens=4)
        self.model.generate(input_ids=self.ids, attention_mask=self.mask, do_sample=True, max_new_tokens=4,
                            min_new_tokens=4, pad_token_id=0, top_k=0)
        for kv_cache in ("dynamic", "static"):
            generate(self.model, self.prompts, seed=0, kv_cache=kv_cache, cuda_graphs="off", **short)
        warm = time.perf_counter()
        self.ours("static", "auto")
        warmup_seconds = time.perf_counter() - warm
        speeds: dict[str, list[float]] = {name: [] for name in configurations}
        for repeat in range(self.sizes["repeats"]):
            for name, fn in configurations.items():
                speeds[name].append(fn(repeat))
        medians = {name: statistics.median(values) for name, values in speeds.items()}
        return {"batch": self.ids.shape[0], "prompt_width": self.ids.shape[1], "new_tokens": self.tokens,
                "tokens_per_s": medians, "runs": speeds, "first_graph_rollout_seconds": warmup_seconds,
                "ours_over_generate": medians["ours static auto"] / medians["model.generate"],
                "auto_over_static_eager": medians["ours static auto"] / medians["ours static eager"]}

    def graph_full(self, seed: int) -> float:
        rollout, speed = self.ours("static", "auto", seed=seed)
        self.full_graph_runs.append(rollout)
        return speed

    def graph_engine(self) -> StaticEngine:
        """The engine `generate(kv_cache="static", cuda_graphs="auto")` uses (graphs on CUDA, eager on CPU)."""
        return engine_for(self.model, self.ids.shape[0], self.ids.shape[1] + self.tokens,
                          graphs=self.device.type == "cuda")

    def graph_stats(self) -> dict[str, Any]:
        if self.device.type != "cuda":
            return {"note": "no CUDA graphs on CPU"}
        engine = self.graph_engine()
        return {**engine.graph_stats(), "kv_cache_mb": engine.cache.nbytes / 2**20,
                "cache_batch": engine.batch, "cache_length": engine.length}

    def nested(self) -> dict[str, Any]:
        cuda_graphs = "auto"
        sampler_sets = {ratio: SkipSampler(self.num_layers, ratio=ratio, seed=1).sample()[1]
                        for ratio in self.sizes["ratios"]}
        speeds: dict[str, list[float]] = {"full": [], **{str(r): [] for r in sampler_sets}}
        for repeat in range(self.sizes["repeats"]):
            speeds["full"].append(self.ours("static", cuda_graphs, seed=repeat)[1])
            for ratio, skip in sampler_sets.items():
                speeds[str(ratio)].append(self.ours("static", cuda_graphs, skip=skip, seed=repeat)[1])
        full = statistics.median(speeds["full"])
        result: dict[str, Any] = {"full_tokens_per_s": full, "runs": speeds}
        for ratio, skip in sampler_sets.items():
            speedup = statistics.median(speeds[str(ratio)]) / full
            ideal = self.num_layers / (self.num_layers - len(skip))
            result[str(ratio)] = {"skipped": list(skip), "speedup": speedup, "ideal": ideal,
                                  "efficiency": speedup / ideal}
        return result

    def compiled(self, peak: float | None) -> dict[str, Any]:
        start = time.perf_counter()
        first_rollout, _ = self.ours("static", "auto", compile_layers=True)  # compiles, captures
        first = time.perf_counter() - start
        speeds: dict[str, list[float]] = {"graphs": [], "graphs + compile": []}
        runs = []
        for repeat in range(self.sizes["repeats"]):
            speeds["graphs"].append(self.ours("static", "auto", seed=repeat)[1])
            rollout, speed = self.ours("static", "auto", seed=repeat, compile_layers=True)
            speeds["graphs + compile"].append(speed)
            runs.append(rollout)
        medians = {name: statistics.median(values) for name, values in speeds.items()}
        engine = engine_for(self.model, self.ids.shape[0], self.ids.shape[1] + self.tokens,
                            graphs=self.device.type == "cuda", compile_layers=True)
        return {"first_rollout_seconds": first, "compile_seconds": first_rollout.compile_seconds,
                "tokens_per_s": medians, "runs": speeds,
                "compiled_over_graphs": medians["graphs + compile"] / medians["graphs"],
                "graphs": engine.graph_stats(), "roofline": self.roofline(peak, runs)}

    def roofline(self, peak: float | None, runs: list | None = None) -> dict[str, Any]:
        runs = runs or self.full_graph_runs or [self.ours("static", "auto")[0]]
        steps = self.tokens - 1  # the first token comes from the prefill
        step_seconds = statistics.median(r.decode_seconds for r in runs) / steps
        model = self.model
        weights = sum(p.numel() * p.element_size() for layer in model.model.layers for p in layer.parameters())
        weights += sum(p.numel() * p.element_size() for p in model.model.norm.parameters())
        weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
        engine = self.graph_engine()
        kv_per_slot = sum(t[0, :, 0].numel() * t.element_size() for t in engine.cache.keys + engine.cache.values)
        rows, prompt = self.ids.shape
        needed_kv = rows * kv_per_slot * (prompt + self.tokens / 2)  # average filled length over the decode
        read_kv = engine.batch * kv_per_slot * engine.length  # graphs read the whole preallocated length
        result = {"step_ms": step_seconds * 1e3, "weight_bytes": weights, "kv_bytes_needed": needed_kv,
                  "kv_bytes_read": read_kv, "peak_bandwidth_bytes_s": peak}
        if peak:
            result["hbm_fraction"] = (weights + needed_kv) / step_seconds / peak
            result["hbm_fraction_counting_masked_reads"] = (weights + read_kv) / step_seconds / peak
        return result

    def profile(self) -> dict[str, Any]:
        """One decode step of the full model at the full batch, eagerly (bucketed) and from graphs."""
        from torch.profiler import ProfilerActivity, profile

        width = self.ids.shape[0]
        results = {}
        engines = {"eager": StaticEngine(self.model, width, self.graph_engine().length, graphs=False, bucketed=True)}
        if self.device.type == "cuda":
            engines["graphs"] = self.graph_engine()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        for name, engine in engines.items():
            if engine.graphs is None:  # give the eager engine a valid state: one short rollout through it
                eos = torch.tensor([0], device=self.device)
                decode(engine.begin((), self.params, eos, width, self.ids.shape[1], 2), self.ids, self.mask,
                       max_new_tokens=2, min_new_tokens=2, eos=eos, pad_token_id=0,
                       uniforms=torch.rand((2, width), dtype=torch.float64, device=self.device))
            engine.write_index.fill_(self.ids.shape[1])
            for _ in range(3):
                engine.decode_step(width, (), self.params)
            synced(time.perf_counter(), self.device)
            with profile(activities=activities) as prof:
                engine.decode_step(width, (), self.params)
                synced(time.perf_counter(), self.device)
            results[name] = summarise_profile(prof)
        del engines["eager"]
        return results


def summarise_profile(prof) -> dict[str, Any]:
    events = prof.key_averages()
    device_time = lambda e: getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))  # noqa: E731
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    launches = {e.key: e.count for e in events
                if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cudaGraphLaunch")}
    top = sorted(kernels, key=device_time, reverse=True)[:15]
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total,
                 reverse=True)[:10]
    return {
        "kernel_launches": launches,
        "kernels": sum(e.count for e in kernels),
        "device_us_total": sum(device_time(e) for e in kernels),
        "top_kernels": [{"name": e.key[:90], "count": e.count, "device_us": round(device_time(e), 1)} for e in top],
        "top_cpu_ops": [{"name": e.key, "count": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1)}
                        for e in ops],
    }


def summarise(report: dict[str, Any]) -> None:
    """The headline numbers against the issue's goals."""
    lines = []
    throughput, nested, roofline = report.get("throughput", {}), report.get("nested", {}), report.get("roofline", {})
    if "ours_over_generate" in throughput:
        ratio = throughput["ours_over_generate"]
        lines.append(f"ours (static, cuda_graphs auto) / model.generate: {ratio:.2f}x  (goal >= 4)")
    if "0.25" in nested:
        lines.append(f"nested efficiency at 0.25: {nested['0.25']['efficiency']:.3f}  (goal >= 0.95); "
                     f"at 0.4: {nested['0.4']['efficiency']:.3f}")
    if "hbm_fraction" in roofline:
        lines.append(f"decode HBM roofline fraction: {roofline['hbm_fraction']:.2f}  (goal >= 0.60)")
    compiled = report.get("compiled", {})
    if "compiled_over_graphs" in compiled and "hbm_fraction" in compiled["roofline"]:
        lines.append(f"with compiled layers: {compiled['compiled_over_graphs']:.2f}x plain graphs, HBM fraction "
                     f"{compiled['roofline']['hbm_fraction']:.2f}, "
                     f"first rollout {compiled['first_rollout_seconds']:.0f} s (compiling "
                     f"{compiled['compile_seconds']:.0f} s)")
    if "step_seconds" in report.get("update", {}):
        update = report["update"]
        lines.append(f"shipped update ({update['precision']}): {update['step_seconds']:.2f} s per step, "
                     f"peak memory {update['peak_memory_mb']:.0f} MiB")
    runs = report.get("train", {})
    for name in ("dynamic", "static", "resumed") if "resumed" in runs else ():
        rows = runs[name]["rows"]
        lines.append(f"train {name}: steps {[r['step'] for r in rows]}, generate "
                     f"{statistics.mean(r['time_generate'] for r in rows):.2f} s and update "
                     f"{statistics.mean(r['time_train'] for r in rows):.2f} s per step, peak memory "
                     f"{max(r['peak_memory_mb'] for r in rows):.0f} MiB, rewards "
                     f"{[round(r['reward_mean'], 2) for r in rows]}"
                     + (f", continued from its checkpoint: {runs[name]['continued']}" if name == "resumed" else ""))
    errors = [name for name, value in report.items() if isinstance(value, dict) and "error" in value]
    if errors:
        lines.append(f"sections with errors: {', '.join(errors)}")
    print("\n".join(["== summary =="] + lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
