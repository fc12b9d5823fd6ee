"""How an embedtrain process ends. No imports beyond the standard library: the CLI and the launched workers of
the tests use it."""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``. A process of a multi-process launch (``WORLD_SIZE`` > 1) leaves through
    ``os._exit`` once stdout and stderr are flushed, without tearing the interpreter down; call it only when every
    file is written and closed (the training loop writes each file whole and closes it). A single process exits
    normally (``sys.exit``).

    Why: torch's gloo backend can abort a finished run at interpreter shutdown. A gloo worker thread may still be
    releasing the last barrier's work, and with it a tensor owned by Python, while the main thread finalizes the
    interpreter; taking the GIL then ends that thread inside a destructor and the process aborts (SIGABRT,
    "terminate called without an active exception"). Seen twice in about 60 two-process launches of a 3-step run on
    2 busy CPU cores; the core dump showed ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` ->
    ``~AsyncAllgatherWork`` -> ``~TensorImpl`` -> ``take_gil`` -> ``pthread_exit`` during ``Py_FinalizeEx``."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
