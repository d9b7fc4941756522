"""Progress of a run as the CLIs show it: rich bars on a terminal, plain lines otherwise.

One helper for `fedbus demo` and `fedbus sim` (and anything else that counts rounds), so a
terminal always gets the same bars and a pipe or a log file always gets one parseable line
per event, whatever the command.
"""

from __future__ import annotations

import sys
from typing import TextIO


class RunProgress:
    """Named bars (``add``/``update``) on a terminal; off a terminal, ``update`` writes the
    plain line it is given (or nothing when it is None). ``note`` prints a line either way."""

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False, tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.quiet = quiet
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.tty = (isatty() if tty is None else tty) and not quiet
        self._bars: dict[str, int] = {}
        self._rich = None

    def _progress(self):
        if self._rich is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("{task.description:>14}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                  console=Console(file=self.stream), transient=False)
            self._rich.start()
        return self._rich

    def add(self, name: str, total: int, description: str | None = None) -> None:
        """A bar ``name`` of ``total`` steps (a terminal only)."""
        if self.tty and name not in self._bars:
            self._bars[name] = self._progress().add_task(description or name, total=max(1, total), detail="")

    def update(self, name: str, completed: int, *, detail: str = "", line: str | None = None) -> None:
        if self.quiet:
            return
        if self.tty:
            if name in self._bars:
                self._progress().update(self._bars[name], completed=completed, detail=detail)
            return
        if line is not None:
            self.stream.write(line + "\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.console.print(text, highlight=False, markup=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def stop(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
            self._bars.clear()
