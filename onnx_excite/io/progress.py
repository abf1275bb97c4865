"""Progress of a job over images, on a console the caller gives (the library prints nothing
of its own): on a terminal a rich bar with the count, images/s, the time spent and the ETA;
elsewhere (a log, a pipe) rich's bar shows nothing, so ``lines=True`` prints one plain line
every ``every_s`` seconds instead ("pointing: 40/200 images, 3.1 images/s, ETA 52 s").
"""
from __future__ import annotations

import time


def _rate_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ImagesPerSecond(ProgressColumn):
        """The task's speed (rich's estimate over its recent steps) in images/s."""

        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text("-- images/s" if speed is None else f"{speed:.2f} images/s")

    return ImagesPerSecond()


def _count_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Count(ProgressColumn):
        """Images done of the total (whole images: a part-written image is not counted)."""

        def render(self, task):
            return Text(f"{int(task.completed + 1e-9)}/{int(task.total or 0)}")

    return Count()


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class ImageProgress:
    """``with ImageProgress(console, "explaining", total) as advance: advance(images)``.

    No console, or ``total`` below ``minimum``: nothing is shown. A terminal: a transient rich
    bar. Not a terminal and ``lines``: a line every ``every_s`` seconds (and none for a job that
    ends sooner). ``advance`` takes fractions (one class of an image explained for several)."""

    def __init__(self, console, description: str, total: float, minimum: int = 4, lines: bool = False,
                 every_s: float = 10.0, clock=time.perf_counter):
        self.console, self.description, self.total = console, description, total
        self.bar, self.lines, self.every_s, self.clock = None, False, every_s, clock
        self.done, self.start, self.last = 0.0, clock(), clock()
        if console is None or total < minimum:
            return
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), _count_column(), _rate_column(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=console, transient=True)
            self.task = self.bar.add_task(description, total=total)
        else:
            self.lines = lines

    def advance(self, n: float = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task, n)
        elif self.lines:
            now = self.clock()
            if now - self.last >= self.every_s and self.done < self.total:
                self.last = now
                self.console.print(self.line(now), markup=False)

    def update(self, done: float) -> None:
        """Set the count (for callers that report the images done so far)."""
        self.advance(done - self.done)

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {format_eta((self.total - self.done) / rate)}" if rate > 0 else ""
        return f"{self.description}: {int(self.done + 1e-9)}/{int(self.total)} images, {rate:.2f} images/s{eta}"

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self.advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
