"""Keeps the TFLite runtime's own start-up chatter off the user's terminal.

The runtimes print ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` from C++ straight
to file descriptor 2 when an interpreter is built (no environment variable or Python API turns it
off in tflite-runtime 2.14 or ai-edge-litert 2.3). :func:`runtime_log_filtered` points fd 2 at a
temporary file while an interpreter is built, then copies everything written there back to the
real stderr except the runtime's ``INFO:`` lines: warnings and errors still show, in order.

fd 2 belongs to the whole process, so the redirection is serialised by a lock; other threads'
writes to stderr during the window are held in the file and copied back when it closes (a file,
not a pipe: a pipe would block a writer once its buffer is full).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = threading.RLock()
_DROPPED = (b"INFO: Created TensorFlow Lite", b"INFO: Initialized TensorFlow Lite")


def drop_runtime_info(text: bytes) -> bytes:
    """``text`` without the runtime's start-up INFO lines."""
    return b"".join(line for line in text.splitlines(keepends=True)
                    if not line.startswith(_DROPPED))


@contextmanager
def runtime_log_filtered() -> Iterator[None]:
    """While the block runs, fd 2 writes are held; afterwards all but the runtime's INFO lines
    reach stderr. Blocks nest: an inner block's kept lines go to the outer block's file."""
    with _LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all (a daemon started with fd 2 closed)
            yield
            return
        try:
            with tempfile.TemporaryFile() as held:
                _flush_python_stderr()
                os.dup2(held.fileno(), 2)
                try:
                    yield
                finally:
                    _flush_python_stderr()
                    os.dup2(saved, 2)
                    held.seek(0)
                    kept = drop_runtime_info(held.read())
                    if kept:
                        os.write(2, kept)
        finally:
            os.close(saved)


def _flush_python_stderr() -> None:
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):  # closed or broken: nothing buffered can be saved anyway
        pass
