"""What a run shows and measures about itself: the progress bar on the terminal (stderr) and the peak
memory of this process (the main process and each worker report theirs)."""

from __future__ import annotations

import resource as _resource
import sys


def progress_bar(quiet: bool):
    """A progress bar on stderr: off when quiet or when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet or not console.is_terminal,
                    transient=False)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM on Linux (reset by exec, unlike ru_maxrss, which a
    child started by fork and exec inherits from its parent), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    per_mb = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return round(_resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss / per_mb, 1)
