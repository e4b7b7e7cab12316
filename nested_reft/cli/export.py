"""`nested-reft export MODEL --out DIR`: a plain Hugging Face model folder, LoRA adapters merged in."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import typer
from rich.console import Console

from nested_reft.errors import UserError


def export(
    model: str = typer.Argument(..., help="Run directory (its latest checkpoint), checkpoint, adapter folder, model folder or alias."),
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist, or be empty)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
) -> None:
    """Write MODEL as a folder that AutoModelForCausalLM.from_pretrained loads without nested-reft or peft.

    A LoRA checkpoint (an adapter folder) is always merged into its base model.
    """
    from nested_reft.models import load_model
    from nested_reft.rundir import ordinary_mode, resolve_model_path

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: '{out}' already exists and is not an empty folder")
    source = resolve_model_path(model)
    merged, tokenizer = load_model(source, dtype=dtype, device="cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # complete or absent, never half
    staging.chmod(ordinary_mode(folder=True))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    Console().print(f"wrote [bold]{out}[/] from {source}")
