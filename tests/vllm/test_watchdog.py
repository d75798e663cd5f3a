"""The step watchdog: a step that runs too long leaves every thread's stack in the
log, once; a step that ends in time leaves nothing."""

import threading
import time

from kvtier.serving import Server
from kvtier.vllm.watchdog import HANG_MARK, StepWatchdog


def stuck_here(release: threading.Event) -> None:   # the frame the dump must show
    release.wait(10)


def test_a_long_step_dumps_every_stack_once(tmp_path, caplog):
    out = open(tmp_path / "log", "w+")
    dog = StepWatchdog(0.2, out=out)
    release = threading.Event()
    helper = threading.Thread(target=stuck_here, args=(release,))
    helper.start()
    try:
        dog.begin()
        deadline = time.monotonic() + 10
        while HANG_MARK not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)   # several more periods: still one dump for this step
    finally:
        release.set()
        helper.join()
        dog.close()
    out.seek(0)
    dump = out.read()
    assert caplog.text.count(HANG_MARK) == 1
    assert "stuck_here" in dump and "test_a_long_step_dumps_every_stack_once" in dump


def test_a_step_that_ends_in_time_dumps_nothing(tmp_path, caplog):
    out = open(tmp_path / "log", "w+")
    dog = StepWatchdog(0.4, out=out)
    try:
        for _ in range(10):   # 10 short steps, 1 s in all
            dog.begin()
            time.sleep(0.1)
            dog.end()
        time.sleep(1.0)   # then an idle engine (no step): nothing either
        assert dog._thread.is_alive()   # still watching (a dead watchdog dumps nothing)
    finally:
        dog.close()
    out.seek(0)
    assert out.read() == "" and HANG_MARK not in caplog.text


def test_the_harness_quotes_the_dump(tmp_path):
    log = tmp_path / "server.log"
    threads = "".join(f'Thread 0x{t:x} (most recent call first):\n  File "w{t}.py", line 3 '
                      f'in f\n\n' for t in range(60))   # a worker has many threads
    log.write_text("start\n" + f"ERROR {HANG_MARK} 130 s (a hang?)\n" + threads
                   + "INFO later\n" * 200)
    s = Server("m", log_path=str(log))
    got = s.hang_dump()
    assert got.startswith("the engine's step watchdog dumped:")
    assert 'File "w0.py"' in got and 'File "w59.py"' in got and "later" not in got
    assert Server("m", log_path=str(tmp_path / "none.log")).hang_dump() == ""
