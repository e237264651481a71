"""The `edgemeta` command line. Each command is a thin shell over a library function; heavy
modules (torch, onnx) are imported inside the commands that need them, so the device commands
work on a machine without torch. One module per group of commands, each registering on the app
of edgemeta.cli.common; none imports from this module.

`edgemeta predict|enroll|forget|classes|build-engine …` registers the device commands only: a
per-image shell loop on a Jetson pays for numpy, ONNX Runtime and Pillow, not for the modules of
every other command (tests/test_imports.py holds it); the first four run without typer at all
when their command line reads plainly (edgemeta.cli.fast)."""
from __future__ import annotations

import importlib
import sys

# Imported in the order `edgemeta --help` lists the commands.
MODULES = ("training", "data", "export", "device", "watch", "serve", "bench", "gallery")
# The commands a device runs in loops, and the one module that registers them all.
DEVICE_COMMANDS = frozenset({"enroll", "predict", "forget", "classes", "review", "correct", "negatives", "limit", "build-engine"})


def register(modules: tuple[str, ...] = MODULES):
    """Import (once) the command modules, which register their commands; returns the app."""
    for name in modules:
        importlib.import_module(f"{__name__}.{name}")
    from .common import app
    return app


def __getattr__(name: str):
    """`edgemeta.cli.app` is the app with every command; `print_json` the one JSON printer."""
    if name == "app":
        return register()
    if name == "print_json":
        from .common import print_json
        return print_json
    raise AttributeError(name)


def main(exit_when_done: bool = True) -> None:
    """The `edgemeta` entry point. A device command run by the fast path ends the process when it is
    done (edgemeta.cli.fast.exit_without_teardown) unless exit_when_done is False (a caller that goes
    on in the same process)."""
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in DEVICE_COMMANDS:
        from .fast import exit_without_teardown, run  # without typer when the command line reads plainly
        if run(sys.argv[1:]):
            if exit_when_done:
                exit_without_teardown()
            return
    register(("device",) if command in DEVICE_COMMANDS else MODULES)()


__all__ = ["app", "main", "print_json", "register"]
