"""What every command shares: the typer app, the one-line error contract, strict JSON, rich
progress, and the training-extra check. What a command prints lives in edgemeta.cli.output (no
typer there, for the device commands' fast path) and is re-exported here."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

import typer
import typer.core

from edgemeta.cli.output import console, err_console, escape, fail, os_error_message, print_json, run_guarded, say_error

__all__ = ["OneLineUsageErrors", "RichProgress", "app", "command", "command_of", "console", "err_console", "escape",
           "fail", "os_error_message", "parse_unknown", "print_json", "require_training_extra", "say_error",
           "writable_target"]


class OneLineUsageErrors(typer.core.TyperGroup):
    """A mistyped command line (an unknown option, a value outside its choices or range) ends the
    way every other user error does: one red `error:` line and exit status 2, not a usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        import click
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            raise SystemExit(exc.exit_code) from None
        except click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            import re  # typer and click both append "Did you mean …?": say it once
            say_error(re.sub(r"( Did you mean [^?]*\?)\1", r"\1", exc.format_message()) + where)
            raise SystemExit(2) from None
        except click.ClickException as exc:
            say_error(exc.format_message())
            raise SystemExit(exc.exit_code) from None
        except click.Abort:
            say_error("aborted")
            raise SystemExit(1) from None
        raise SystemExit(code if isinstance(code, int) else 0)  # commands return None; an exit code otherwise


app = typer.Typer(cls=OneLineUsageErrors, help="edgemeta: few-shot image classification from meta-training to an edge device.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
def require_training_extra() -> None:
    """Fail at the point of use, with the install command, when torch & co. are missing (a device
    install: enroll/predict/forget/classes/bench/eval --bundle work without them)."""
    from edgemeta.runtime.extras import require
    require("torch", "safetensors", "onnx", purpose="this command")


def command(*args, **kwargs):
    """app.command() whose user errors and environment faults end in one red line and exit status 2,
    never a traceback."""
    return command_of(app, *args, **kwargs)


def command_of(group: typer.Typer, *args, **kwargs):
    """The same for a command of a sub-app (`edgemeta gallery export`)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            run_guarded(fn, *a, **kw)
        return group.command(*args, **kwargs)(wrapper)
    return deco


class RichProgress:
    """runtime.progress.Progress drawn with rich: a bar for tasks, a cyan bullet for messages."""

    def __init__(self, enabled: bool = True):
        from typing import Any
        self.enabled = enabled
        self._bar: Any = None   # a rich.progress.Progress while a task runs (rich is imported only then)
        self._task: Any = None

    def start(self, label: str, total: int | None = None, completed: int = 0) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.finish()
        self._bar = Progress(TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), TextColumn("{task.description}"), transient=label != "train",
                             console=err_console.real())
        self._bar.__enter__()
        self._task = self._bar.add_task("", total=total, completed=completed)

    def update(self, completed: int | None = None, note: str = "") -> None:
        if self._bar is None:
            return
        if completed is None:
            self._bar.advance(self._task)
        else:
            self._bar.update(self._task, completed=completed)
        if note:
            self._bar.update(self._task, description=escape(note))

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(f"[cyan]•[/] {escape(text)}")


# What an output of each kind carries, so that an existing file is replaced only when edgemeta wrote
# it for that purpose: bench JSON its schema, bench plots a PNG text chunk (render_plot), watch JSONL
# its per-frame record, galleries their format.
PLOT_MARK = b"edgemeta bench"


def writable_target(path: Optional[Path], what: str, inputs: tuple[Optional[Path], ...] = (), kind: str | None = None) -> None:
    """Check before a long run that an output file can be written there: its folder exists and is
    writable, it is not a folder, not inside one of the command's own inputs (a bundle, a store) nor
    one of them, not inside any bundle or store (their files are theirs), and — where it exists
    already — a file edgemeta wrote as this kind of output (`kind`: bench-json, bench-png,
    watch-jsonl, gallery), never something else that writing would truncate."""
    from edgemeta.runtime.errors import ConfigError
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"{what} {path}: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"{what} {path}: folder {path.parent} is not writable")
    target = path.resolve()
    for source in inputs:
        if source is None:
            continue
        own = source.resolve()
        if target == own or own in target.parents:
            raise ConfigError(f"{what} {path} is inside the command's own input {source}; writing it would damage "
                              "that input — choose another path")
    for folder in target.parents:
        if (folder / "manifest.json").is_file() or (folder / "enrollment.npz").is_file():
            which = "a bundle" if (folder / "manifest.json").is_file() else "an enrollment store"
            raise ConfigError(f"{what} {path} is inside {which} ({folder}); its files are its own — choose another path")
    if kind == "bench-png" and path.suffix.lower() != ".png":
        raise ConfigError(f"{what} {path}: the plot is a PNG image; give a file name ending in .png")
    if kind is not None and path.is_file() and path.stat().st_size and not _is_kind(path, kind):
        raise ConfigError(f"{what} {path} exists and is not a file edgemeta wrote as {kind.replace('-', ' ')} output; "
                          "it will not be overwritten")


def _is_kind(path: Path, kind: str) -> bool:
    """Whether an existing file is an output edgemeta wrote as this kind (read from its start only)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if kind == "bench-png":
        return head.startswith(b"\x89PNG\r\n\x1a\n") and PLOT_MARK in head
    if kind == "gallery":
        try:
            from edgemeta.runtime.gallery import GALLERY_FORMAT, read_header
            return read_header(path).get("format") == GALLERY_FORMAT
        except Exception:
            return False
    try:
        if kind == "watch-jsonl":
            first = json.loads(head.decode("utf-8").splitlines()[0])
            return isinstance(first, dict) and {"frame", "timestamp", "label"} <= set(first)
        if kind == "bench-json":
            from edgemeta.runtime.bench import BENCH_SCHEMA
            return json.loads(path.read_text()).get("schema") == BENCH_SCHEMA
    except (UnicodeDecodeError, ValueError, IndexError, AttributeError):
        return False
    raise ValueError(f"unknown output kind {kind!r}")


def parse_unknown(text: Optional[str]) -> float | str | None:
    """--unknown: None (never reject), 'auto' (calibrated on the support set) or a finite distance ≥ 0."""
    from edgemeta.runtime.classifier import parse_unknown as parse
    return parse(text, "--unknown")
