"""Entry point of the `nested-reft` command.

Each command lives in its own module as a plain function and is registered here. Errors caused by the user
(`UserError`) become one red line and exit code 2; `--debug` shows the full traceback instead. A boolean flag
may be given a word, as its help's `<bool>` suggests: `--resume true` is `--resume`, `--overwrite=false` nothing.
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
from nested_reft.cli.recipe import recipe
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
app.command("recipe")(recipe)

_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    # Eager: it runs while the arguments are parsed, before a missing command is an error.
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    _state["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. A UserError is one line on stderr and its exit code, 2 (3 for a diverged run), unless
    --debug; a run stopped on request says how to resume and exits 128 + the signal (130 Ctrl-C, 143 SIGTERM)."""
    args = flag_words(list(sys.argv[1:] if argv is None else argv))
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


_WORDS = {"true": True, "yes": True, "false": False, "no": False}


def flag_words(args: list[str]) -> list[str]:
    """`args` with each boolean flag given a word (`--resume true`, `--overwrite=false`) turned into the flag alone
    or nothing. Only true/yes/false/no count as words, so a flag followed by a path keeps its path."""
    command = typer.main.get_command(app)
    flags = {name for c in [command, *command.commands.values()] for p in c.params
             if getattr(p, "is_flag", False) and getattr(p, "is_bool_flag", False) for name in p.opts}
    out: list[str] = []
    words = iter(range(len(args)))
    for i in words:
        name, eq, value = args[i].partition("=")
        word = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        if name not in flags or word.lower() not in _WORDS:
            out.append(args[i])
            continue
        if not eq:
            next(words)  # the word is consumed with its flag
        if _WORDS[word.lower()]:
            out.append(name)
    return out


def resume_command(args: list[str]) -> str:
    """The command line that continues a stopped `train`: the same arguments, --resume instead of --overwrite."""
    kept = [a for a in args if a not in ("--resume", "--overwrite")]
    return shlex.join(["nested-reft", *kept, "--resume"])


if __name__ == "__main__":
    main()
