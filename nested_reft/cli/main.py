"""Entry point of the `nested-reft` command.

Each command lives in its own module as a plain function and is registered here. Errors caused by the user
(`UserError`) become one red line and exit code 2; `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import shlex
import sys

import typer
from rich.console import Console
from rich.markup import escape

from nested_reft import __version__
from nested_reft.cli.bench import bench
from nested_reft.cli.calibrate import calibrate_skips
from nested_reft.cli.evaluate import evaluate
from nested_reft.cli.export import export
from nested_reft.cli.plot import plot
from nested_reft.cli.prepare_data import prepare_data
from nested_reft.cli.train import train
from nested_reft.errors import UserError
from nested_reft.stopping import TrainingStopped

app = typer.Typer(
    name="nested-reft",
    help="Reinforcement fine-tuning with verifiable rewards, sampled by a layer-skipped view of the model (Nested-ReFT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("prepare-data")(prepare_data)
app.command("calibrate-skips")(calibrate_skips)
app.command("train")(train)
app.command("evaluate")(evaluate)
app.command("bench")(bench)
app.command("plot")(plot)
app.command("export")(export)

_state = {"debug": False}


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    _state["debug"] = debug
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. A UserError is one line on stderr and its exit code, 2 (3 for a diverged run), unless
    --debug; a run stopped on request says how to resume and exits 128 + the signal (130 Ctrl-C, 143 SIGTERM)."""
    args = list(sys.argv[1:] if argv is None else argv)
    stderr = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        app(args=args, prog_name="nested-reft")
    except UserError as e:
        if _state["debug"]:
            raise
        stderr.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(e.exit_code)
    except TrainingStopped as e:
        stderr.print(f"[bold yellow]stopped:[/] {escape(str(e))}")
        stderr.print(f"resume with: {escape(resume_command(args))}")
        sys.exit(e.exit_code)


def resume_command(args: list[str]) -> str:
    """The command line that continues a stopped `train`: the same arguments, --resume instead of --overwrite."""
    kept = [a for a in args if a not in ("--resume", "--overwrite")]
    return shlex.join(["nested-reft", *kept, "--resume"])


if __name__ == "__main__":
    main()
