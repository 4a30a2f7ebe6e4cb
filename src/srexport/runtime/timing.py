"""Stage timers and memory probes for the pipeline and ``srexport bench``.

A timer measures named stages of one run: ``start(name)`` / ``stop(name)``
(or ``with timer.stage(name):``), then ``seconds()`` per stage and ``total()``
from the first start to the last stop. A stage entered several times (tiles,
two UNet passes) accumulates. A timer serves one run; make a new one per run.

- ``HostTimer``: ``time.perf_counter`` around each stage. With ``sync`` (e.g.
  ``torch.cuda.synchronize``) it waits for queued device work at each stage
  boundary, so asynchronous work is charged to the stage that queued it.
  The right timer on CPU, where every runner is synchronous.
- ``CudaEventTimer``: CUDA events recorded on the runners' stream at each
  stage boundary, read once at the end of the run (one synchronisation per
  run, none between stages, so the timer does not serialise the pipeline).
  Events measure device time on that stream; host gaps between stages that
  leave the device idle show up in the total, not in a stage.

``summarize`` turns per-iteration samples into median / p90 statistics, and
the memory probes report peak host RSS and device memory over a window.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Protocol

class Timer(Protocol):
    kind: str

    def start(self, name: str) -> None: ...

    def stop(self, name: str) -> None: ...

    def stage(self, name: str) -> contextlib.AbstractContextManager: ...

    def seconds(self) -> dict[str, float]:
        """Seconds per stage (a stage started several times accumulates)."""
        ...

    def total(self) -> float:
        """Seconds from the first stage's start to the last stage's end."""
        ...


class _StageTimer:
    """start/stop bookkeeping shared by the timers; subclasses make the marks."""

    kind = ""

    def __init__(self):
        self._open: dict[str, object] = {}
        self._spans: list[tuple[str, object, object]] = []

    def _mark(self):
        raise NotImplementedError

    def _elapsed(self, start, end) -> float:
        raise NotImplementedError

    def _wait(self) -> None:
        pass

    def start(self, name: str) -> None:
        if name in self._open:
            raise RuntimeError(f"stage {name!r} started twice")
        self._open[name] = self._mark()

    def stop(self, name: str) -> None:
        self._spans.append((name, self._open.pop(name), self._mark()))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def seconds(self) -> dict[str, float]:
        self._wait()
        out: dict[str, float] = {}
        for name, start, end in self._spans:
            out[name] = out.get(name, 0.0) + self._elapsed(start, end)
        return out

    def total(self) -> float:
        if not self._spans:
            return 0.0
        self._wait()
        first = min(self._spans, key=lambda s: self._order(s[1]))[1]
        last = max(self._spans, key=lambda s: self._order(s[2]))[2]
        return self._elapsed(first, last)

    def _order(self, mark) -> float:
        return mark


class HostTimer(_StageTimer):
    """perf_counter per stage, with an optional device synchronisation at each boundary."""

    kind = "host perf_counter"

    def __init__(self, sync: Callable[[], None] | None = None):
        super().__init__()
        self._sync = sync
        if sync is not None:
            self.kind = "host perf_counter + device sync"

    def _mark(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def _elapsed(self, start: float, end: float) -> float:
        return end - start


class CudaEventTimer(_StageTimer):
    """CUDA events recorded on ``stream`` (default: torch's current stream) at each boundary."""

    kind = "cuda events"

    def __init__(self, stream=None):
        super().__init__()
        import torch

        self._torch = torch
        self._stream = stream if stream is not None else torch.cuda.current_stream()
        self._count = 0

    def _mark(self):
        event = self._torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        self._count += 1
        return (self._count, event)

    def _order(self, mark) -> float:
        return mark[0]

    def _elapsed(self, start, end) -> float:
        return start[1].elapsed_time(end[1]) / 1e3

    def _wait(self) -> None:
        if self._spans:
            max((s[2] for s in self._spans), key=self._order)[1].synchronize()


def make_timer(device: str = "cpu", stream=None, kind: str = "auto") -> Timer:
    """The right timer for where a runner computes: CUDA events on its stream on a GPU
    (``kind="host"`` forces perf_counter with synchronisation), perf_counter on CPU."""
    if not str(device).startswith("cuda"):
        return HostTimer()
    if kind == "host":
        import torch

        return HostTimer(sync=torch.cuda.synchronize)
    return CudaEventTimer(stream)


# --- statistics -------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Seconds over the timed iterations (warm-up excluded)."""

    n: int
    median: float
    p90: float
    mean: float
    min: float
    max: float
    stdev: float

    def to_dict(self) -> dict:
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: list[float]) -> Stats:
    if not values:
        raise ValueError("no samples")
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return Stats(n, percentile(values, 50), percentile(values, 90), mean, min(values), max(values), math.sqrt(var))


# --- memory ------------------------------------------------------------------------


class HostMemoryProbe:
    """Peak resident set size of this process over a window.

    On Linux the kernel's own high-water mark is reset at the start
    (``/proc/self/clear_refs`` <- 5) and read at the end (``VmHWM``): exact,
    at no cost. Elsewhere a thread samples RSS every few milliseconds.
    ``baseline`` is the RSS when the window opened, so ``peak - baseline`` is
    what the measured work added (activations, workspaces, arenas grown).
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._kernel = False

    @staticmethod
    def rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def __enter__(self) -> "HostMemoryProbe":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._kernel = _vm_hwm() is not None
        except OSError:
            self._kernel = False
        # read after the reset: the high-water mark starts at this RSS, so peak - baseline is what
        # the window added even when RSS fell between an earlier read and the reset
        self.baseline = self.peak = self.rss()
        if not self._kernel:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc) -> None:
        if self._kernel:
            self.peak = max(self.peak, _vm_hwm() or 0, self.rss())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def method(self) -> str:
        return "VmHWM (reset via /proc/self/clear_refs)" if self._kernel else f"psutil RSS sampled every {self.interval * 1e3:g} ms"


def _vm_hwm() -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class DeviceMemoryProbe:
    """Peak CUDA memory over a window: torch's allocator peak (exact, torch tensors
    only) and the device-wide used memory (every allocator and context: what
    onnxruntime and TensorRT take too), sampled by ``sample()`` after each run."""

    def __init__(self, device: str = "cuda"):
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.torch_peak = 0
        self.used_peak = 0
        self.used_baseline = 0

    def _used(self) -> int:
        free, total = self._torch.cuda.mem_get_info(self.device)
        return total - free

    def __enter__(self) -> "DeviceMemoryProbe":
        self._torch.cuda.synchronize(self.device)
        self._torch.cuda.reset_peak_memory_stats(self.device)
        self.used_baseline = self.used_peak = self._used()
        return self

    def sample(self) -> None:
        self.used_peak = max(self.used_peak, self._used())

    def __exit__(self, *exc) -> None:
        self._torch.cuda.synchronize(self.device)
        self.sample()
        self.torch_peak = self._torch.cuda.max_memory_allocated(self.device)
