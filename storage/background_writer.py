"""A background thread that runs one activation writer, so encoding and disk writes overlap the
next forward pass."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from sae_transfer.storage.activations_write import ActivationWriter


class BackgroundWriter:
    """Runs one `ActivationWriter` on a worker thread fed through a bounded queue.

    Each queued job is a callable returning `append`'s arguments; it runs on the worker thread
    (e.g. waiting for device-to-host copies, converting to numpy), and so does the Parquet
    encoding, which releases the GIL: both overlap the caller's next forward pass. At most
    `depth` jobs wait, so memory stays bounded. A failure on the worker is re-raised, as the
    same exception, by the caller's next `put` or by `close`; later jobs are skipped, and shards
    already completed stay on disk for a resume.
    """

    def __init__(self, writer: ActivationWriter, depth: int = 3):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="activation-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                self.writer.append(*job())
            except BaseException as exc:  # surfaced on the caller's thread by put/close
                self.error = exc

    def put(self, job: Callable[[], tuple]) -> None:
        """Queue one job (blocks while `depth` jobs are waiting); re-raise an earlier failure."""
        if self.error is not None:
            raise self.error
        self.queue.put(job)

    def close(self, abandon: bool = False) -> None:
        """Wait for queued jobs to be written (or drop them with `abandon`); re-raise a failure."""
        if abandon:
            while True:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and not abandon:
            raise self.error
