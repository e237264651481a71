"""The `edgemeta` command line. Each command is a thin shell over a library function; heavy
modules (torch, onnx) are imported inside the commands that need them, so the device commands
work on a machine without torch. One module per group of commands, each registering on the app
of edgemeta.cli.common; none imports from this module."""
from __future__ import annotations

# Imported in the order `edgemeta --help` lists the commands.
from . import training, data, export, device, watch, serve, bench, gallery  # noqa: F401,I001  (registers the commands)
from .common import app, print_json

__all__ = ["app", "main", "print_json"]


def main() -> None:
    app()
