"""Another process holding a warehouse's run lock, for the tests of etl/lock.py and of the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from data_paths import PROJECT


def hold_in_child(warehouse: Path, seconds: float, die: bool = False) -> subprocess.Popen:
    """A child process that takes the lock as a `run` in stage fetch, holds it `seconds`, then
    releases it, or dies holding it (`die`). Returns once the lock is held."""
    code = (
        "import os, sys, time\n"
        "from etl.lock import warehouse_lock\n"
        f"with warehouse_lock({str(warehouse)!r}, 'child', 'run') as held:\n"
        "    held.set_stage('fetch')\n"
        "    print('held', flush=True)\n"
        f"    time.sleep({seconds})\n"
        f"    if {die}: os._exit(9)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child
