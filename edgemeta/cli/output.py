"""What a command prints, without typer: the lazy rich consoles, the one-line error contract and
strict JSON. The device commands' fast path (edgemeta.cli.fast) runs on this module alone."""
from __future__ import annotations

import json
import os
import sys
from typing import NoReturn

from edgemeta.runtime.errors import EdgemetaError


class _Console:
    """A rich Console made at its first use: a command that prints JSON (or nothing) never imports
    rich, which a device command run once per image in a shell loop would pay each time."""

    def __init__(self, **options):
        self._options, self._console = options, None

    def real(self):
        """The rich Console itself."""
        if self._console is None:
            from rich.console import Console
            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.real(), name)


def escape(text: str) -> str:
    """rich's markup escape, imported when first needed."""
    from rich.markup import escape as rich_escape
    return rich_escape(text)


console = _Console()
err_console = _Console(stderr=True, soft_wrap=True)  # one error, one line


def printable(text: str) -> str:
    """Control characters shown escaped: a label, a path or a message never moves the cursor."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def print_table(header: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """Plain columns aligned with spaces, as `grep`, `awk` and `column` read them. The device
    commands print tables this way: rich's import would cost a shell loop more than the model."""
    cells = [[printable(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    if title is not None:
        print(printable(title))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def say_error(message: str) -> None:
    """One red `error:` line on stderr (control characters shown escaped)."""
    err_console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False)


def fail(message: str) -> None:
    """One red `error:` line on stderr, then exit status 2."""
    say_error(message)
    raise SystemExit(2)


def os_error_message(exc: OSError) -> str:
    """An environment fault (permission denied, read-only or full disk, a file in the way) as one line."""
    where = " → ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {where}" if where else reason


def run_guarded(fn, *args, **kwargs) -> None:
    """Run a command's body: its user errors and environment faults end in one red line and exit
    status 2, never a traceback. A command's result is what it prints."""
    try:
        fn(*args, **kwargs)
    except EdgemetaError as exc:
        fail(str(exc))
    except BrokenPipeError:
        end_for_closed_pipe()
    except OSError as exc:
        fail(os_error_message(exc))
    except MemoryError:
        fail("out of memory; use smaller images or batches")


def end_for_closed_pipe() -> NoReturn:
    """The reader stopped reading (`edgemeta predict … | head`): end quietly, as other command-line
    tools do, with the status a shell reports for a tool the pipe ended (128 + SIGPIPE)."""
    import contextlib
    with contextlib.suppress(OSError, ValueError):  # a stdout without a file descriptor (a test's capture)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush goes nowhere
    raise SystemExit(141)


def print_json(value, indent: int | None = None) -> None:
    """Strict JSON on stdout: a NaN or infinity (never valid JSON) is written as null."""
    print(json.dumps(_finite(value), indent=indent, allow_nan=False))


def _finite(value):
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
