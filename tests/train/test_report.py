"""megamoe.train.report: the CPU peak memory the trainer logs is its own, not its launcher's."""

import json
import subprocess
import sys

from tests.train.helpers import ROOT

_PARENT = """
import json, subprocess, sys
held = bytearray(1024 * 2**20)
held[::4096] = b"x" * len(held[::4096])  # resident: 1 GiB
child = '''
import json, resource
from megamoe.train.report import peak_rss_mb
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''
out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
print(out.strip().splitlines()[-1])
"""


def test_peak_rss_is_the_process_own_not_its_launchers():
    """A child of a process holding 1 GiB: Linux's ru_maxrss (what the trainer read before)
    says >= 1 GiB, VmHWM says what the child touched (torch's import, ~0.3 GiB). This is why a
    trainer launched by a grown pytest once reported 862 MiB of training memory it never had."""
    p = subprocess.run([sys.executable, "-c", _PARENT], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["ru_maxrss_mb"] >= 1024, got  # the trap, present on this kernel
    assert got["peak_rss_mb"] < 700, got
