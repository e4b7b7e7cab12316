"""Entry point of the `nested-reft` command.

Each command lives in its own module as a plain function and is registered here. Errors caused by the user
(`UserError`) become one red line and exit code 2; `--debug` shows the full traceback instead.
"""

from __future__ import annotations

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
    """Run the CLI; a UserError exits 2 with one line on stderr (unless --debug)."""
    try:
        app(args=argv, prog_name="nested-reft")
    except UserError as e:
        if _state["debug"]:
            raise
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
