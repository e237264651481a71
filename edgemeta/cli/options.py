"""Options several commands share, declared once as `Annotated` aliases. Their choices come from
the registries (heads, backends, the bundle's variants), so `--help` lists what is registered and a
value outside them is one error line before anything loads."""
from __future__ import annotations

from typing import Annotated, Optional

import click
import typer

from edgemeta.runtime.backends import backend_help, parse_backend
from edgemeta.runtime.bundle import VARIANTS
from edgemeta.runtime.errors import ConfigError
from edgemeta.runtime.heads import head_names


def _check_backend(value: str) -> str:
    try:
        parse_backend(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


_check_backend.fast_check = "backend"  # type: ignore[attr-defined]  # what edgemeta.cli.fast checks in its place

HEAD_CHOICES = click.Choice(head_names())

BackendOption = Annotated[str, typer.Option(help=backend_help(), callback=_check_backend)]
VariantOption = Annotated[str, typer.Option(
    click_type=click.Choice((*VARIANTS, "auto")),
    help="The bundle's graph; auto: the fastest on this machine, measured once, never slower than fp32.")]
PrecisionOption = Annotated[str, typer.Option(click_type=click.Choice(VARIANTS),
                                              help="Built from that ONNX variant of the bundle.")]
HeadOption = Annotated[Optional[str], typer.Option(click_type=HEAD_CHOICES, show_choices=True,
                                                   help="The head fitted on the enrolled shots (default: the store's, else the bundle's).")]
TopKOption = Annotated[int, typer.Option(min=1, help="The K most likely classes.")]
