"""The `flywheel` command line: one sub-app per node, assembled here, with one error handler.

cli/training.py, tracking.py, serving.py, monitoring.py, data.py and control.py each hold their
node's verbs; this module puts them on one root command, grouped by node in `--help`. Commands
import their node's modules inside the function, so `flywheel --help` stays fast and importing this
module does no work beyond typer.

Errors: commands raise; the root command's `invoke` (which `main()` and test runners both go
through) is the one place that turns a FlywheelError into one red line and an exit code. The codes
are EXIT_CODES below, shown in `flywheel --help` and docs/troubleshooting.md.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from flywheel.cli import control, data, init, monitoring, serving, tracking, training

EXIT_CODES = ("Exit codes: 0 done; 1 a check or some predictions failed (doctor, stack status, predict), "
              "or remote-train's job exit code; 2 a usage error or a problem you can fix (one red line says "
              "how); 3 rejected: a release failed its checks and rolled back, or the gate did not register "
              "the run (register); 130 interrupted.")


class _Root(TyperGroup):
    """The root command: maps errors of every sub-command to one red line and an exit code."""

    def invoke(self, ctx: typer.Context):
        from flywheel.core.errors import FlywheelError, Rejected

        try:
            return super().invoke(ctx)
        except FlywheelError as exc:
            from flywheel.cli._common import print_error

            print_error(str(exc))
            raise typer.Exit(3 if isinstance(exc, Rejected) else 2) from None


app = typer.Typer(cls=_Root, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Flywheel: continuous training and delivery for PyTorch models on MLflow.",
                  epilog=EXIT_CODES)
for _node in (training, init, tracking, serving, monitoring, data, control):
    app.registered_commands += _node.app.registered_commands
    app.registered_groups += _node.app.registered_groups


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flywheel")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from flywheel import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"flywheel {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the package version and exit.")] = False,
) -> None:
    pass


def main() -> None:
    from flywheel.core.procs import skip_final_collection

    skip_final_collection()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
