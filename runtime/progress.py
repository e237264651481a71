"""One way for library code to report progress: a Progress object the caller passes in. Library
code never prints; the CLI renders progress with rich (edgemeta.cli.common.RichProgress), and the
default, Silent, shows nothing."""
from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, label: str, total: int | None = None, completed: int = 0) -> None:
        """A task of `total` units begins (None: of unknown length)."""

    def update(self, completed: int | None = None, note: str = "") -> None:
        """Units done so far (None: one more than before) and a short note (loss, accuracy…)."""

    def finish(self) -> None:
        """The current task ended."""

    def message(self, text: str) -> None:
        """A one-line report of a finished stage ("parity vs torch: …")."""


class Silent:
    """Progress that shows nothing: the default of every library function."""

    def start(self, label: str, total: int | None = None, completed: int = 0) -> None:
        pass

    def update(self, completed: int | None = None, note: str = "") -> None:
        pass

    def finish(self) -> None:
        pass

    def message(self, text: str) -> None:
        pass


SILENT = Silent()
