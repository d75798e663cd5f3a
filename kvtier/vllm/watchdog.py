"""A hung engine step leaves evidence: every thread's stack, in the server log.

vLLM kills an engine whose step runs past VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS
(300 s) with "EngineCore encountered an issue", which says nothing about where
the worker was stuck. The worker connector marks each step's start (vLLM hands
it the step's metadata before the forward: handle_preemptions, then
bind_connector_metadata) and end (the step's transfer results are taken, or the
metadata cleared); a daemon thread that finds a step running longer than
``KVTIER_HANG_DUMP_S`` (default 120 s; 0: off) logs that once and dumps every
Python thread's stack to stderr (faulthandler), before vLLM's timeout ends it.

The cost per step is two attribute writes; the thread wakes every few seconds.
A native call that holds the GIL while stuck also stops this thread: then there
is no dump, as before.
"""

import faulthandler
import logging
import os
import sys
import threading
import time

log = logging.getLogger("vllm.kvtier.watchdog")

DEFAULT_LIMIT_S = 120.0
HANG_MARK = "kvtier: an engine step has run"   # the log line (kvtier.serving finds it)


def limit_from_env() -> float:
    raw = os.environ.get("KVTIER_HANG_DUMP_S", "")
    try:
        return float(raw) if raw else DEFAULT_LIMIT_S
    except ValueError:
        log.warning("kvtier: KVTIER_HANG_DUMP_S=%r is not a number of seconds; using %.0f",
                    raw, DEFAULT_LIMIT_S)
        return DEFAULT_LIMIT_S


class StepWatchdog:
    def __init__(self, limit_s: float, out=None):
        self.limit_s = limit_s
        self.out = out          # a file with fileno() (faulthandler writes to it); stderr
        self._started: float | None = None
        self._step = 0          # steps begun; a dump is once per step
        self._dumped = -1
        self._stop = threading.Event()
        self._thread = None
        if limit_s > 0:
            self._thread = threading.Thread(target=self._watch, name="kvtier-watchdog",
                                            daemon=True)
            self._thread.start()

    def begin(self) -> None:
        self._step += 1
        self._started = time.monotonic()

    def end(self) -> None:
        self._started = None

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        period = min(5.0, self.limit_s / 4)
        while not self._stop.wait(period):
            started, step = self._started, self._step
            if started is None or step == self._dumped:
                continue
            ran = time.monotonic() - started
            if ran > self.limit_s:
                self._dumped = step
                log.error("%s %.0f s (a hang?); the stack of every thread of this "
                          "worker follows", HANG_MARK, ran)
                try:
                    out = self.out or sys.stderr
                    out.flush()
                    faulthandler.dump_traceback(file=out, all_threads=True)
                except Exception as e:   # (no file descriptor): the thread lives on
                    log.error("kvtier: dumping the stacks failed: %s", e)
