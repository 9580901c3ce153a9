"""Progress of a conversion (tensors done / total and throughput, on a tqdm bar on stderr) and
its outcome (:class:`ConversionReport`, with the peak RSS of every process)."""

from __future__ import annotations

import dataclasses
import resource
import time
from types import TracebackType

from tqdm import tqdm


class TensorProgress:
    """A bar counting tensors, with the bytes/s of the data moved; silent when ``enabled`` is False."""

    def __init__(self, total: int | None, desc: str, *, enabled: bool = True) -> None:
        self._bar = tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)
        self._start = time.monotonic()
        self.bytes = 0
        self.tensors = 0

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.bytes += nbytes
        self.tensors += tensors
        rate = self.bytes / max(time.monotonic() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{self.bytes / 2**20:,.0f} MiB, {rate / 2**20:,.1f} MiB/s", refresh=False)
        self._bar.update(tensors)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> TensorProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What a conversion did: tensors and bytes written, seconds, peak RSS of each process (bytes)."""

    tensors: int
    bytes: int
    seconds: float
    peak_rss: dict[str, int]

    def summary(self) -> str:
        rss = ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in self.peak_rss.items())
        rate = self.bytes / 2**20 / max(self.seconds, 1e-9)
        return (
            f"{self.tensors} tensors, {self.bytes / 2**20:,.1f} MiB in {self.seconds:.1f} s "
            f"({rate:,.1f} MiB/s); peak RSS: {rss}"
        )


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
