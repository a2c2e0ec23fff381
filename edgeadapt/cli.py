"""The ``edgeadapt`` command line: one click group, each command living beside its subsystem.

Commands import their heavy dependencies (torch, backends) inside the function body, so
``edgeadapt --help`` is fast. Every :class:`~edgeadapt.errors.EdgeAdaptError` becomes a one-line
``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys

import click

from edgeadapt.errors import EdgeAdaptError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # noqa: D102 - click hook
        try:
            return super().invoke(ctx)
        except EdgeAdaptError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="edgeadapt")
def main() -> None:
    """Sparse adapters from training to the device: train, export, switch, benchmark."""


def _register() -> None:
    from edgeadapt.bench.cli import bench
    from edgeadapt.export.cli import export
    from edgeadapt.train.cli import quickstart, train

    for command in (train, export, bench, quickstart):
        main.add_command(command)


_register()


if __name__ == "__main__":
    main()
