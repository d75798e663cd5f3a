"""benchmarks/stamp.py: the date, commit and machine every benchmark's JSON carries."""

import datetime
import json
import subprocess

import pytest

from benchmarks.stamp import REPO, line, stamp


def git(*args):
    r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def test_stamp_names_the_checkout_the_date_and_the_machine():
    st = stamp()
    json.dumps(st)
    head = git("rev-parse", "--short=10", "HEAD")
    if head is None:
        pytest.skip("not a git checkout")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    assert st["commit"] == head + ("+dirty" if dirty else "")
    when = datetime.datetime.strptime(st["date_utc"], "%Y-%m-%d %H:%M").replace(
        tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 120
    assert "CPUs" in st["machine"] and "GiB RAM" in st["machine"]
    assert line(st) == f"{st['date_utc']} UTC, commit {st['commit']}, {st['machine']}"
