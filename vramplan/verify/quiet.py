"""Quiet the libraries while `verify` runs the step: what they print is not the user's business.

Three sources of noise, each silenced where it comes from:
- torch's profiler (the CPU trace runs under torch.profiler): libkineto writes
  "USDT:... profiler_start/stop" and "STAGE:..." lines from C++ straight to file
  descriptor 2, past Python, and KINETO_LOG_LEVEL does not silence them (torch 2.13). File
  descriptor 2 is sent to a temporary file while the step runs, Python's sys.stderr (the
  progress display, our own lines) to a copy of the real one; afterwards every captured line
  that is not the profiler's is written out, so a real error from native code is still seen.
- library warnings (transformers' FutureWarning on is_gradient_checkpointing, torch's
  DeprecationWarnings): ignored for the run.
- library loggers (bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community"
  at import, bitsandbytes/backends/cpu/ops.py:253 in 0.50.2): raised to ERROR for the run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

PROFILER_LINE = re.compile(r"^(USDT|STAGE):\S+ \S+ \d+:\d+ \S+\] ")
QUIET_LOGGERS = ("bitsandbytes", "transformers", "peft", "hqq", "torch.distributed")


def noise_free(text: str) -> str:
    """The captured native output without the profiler's lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not PROFILER_LINE.match(line))


@contextlib.contextmanager
def _loggers_at_error() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in saved:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[None]:
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no file descriptor 2 (an embedding host): nothing to quiet
        yield
        return
    saved_stderr = sys.stderr
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(real), "wb"), write_through=True)
        try:
            yield
        finally:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = saved_stderr
            os.dup2(real, 2)
            os.close(real)
            captured.seek(0)
            rest = noise_free(captured.read().decode(errors="replace"))
            if rest:
                saved_stderr.write(rest)
                saved_stderr.flush()


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Warnings off, library loggers at ERROR, the profiler's native lines dropped."""
    with warnings.catch_warnings(), _loggers_at_error(), _native_stderr_captured():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
