"""Run a command, pass its output through, then print one JSON line with its peak memory.

``maxrss_mib``: the largest process in the command's tree (Linux reports the maximum over the
waited-for descendants: the Python process or a pg_dump/pg_restore it ran).
``process_peak_mib``: the command's own process alone (its VmHWM, read until it exits).
"""

import json
import os
import subprocess
import sys
import threading
import time

proc = subprocess.Popen(sys.argv[1:])
peak = [0]


def watch() -> None:
    # VmHWM is a high-water mark: the last value read before exit is the process's peak.
    # (No proc.poll() here: it could reap the child before os.wait4 collects its rusage.)
    while True:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
        except OSError:
            return
        time.sleep(0.05)


watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
_, status, usage = os.wait4(proc.pid, 0)
code = os.waitstatus_to_exitcode(status)
sys.stdout.flush()
print(json.dumps({"exit": code, "maxrss_mib": round(usage.ru_maxrss / 1024, 1), "process_peak_mib": round(peak[0] / 1024, 1)}))
sys.exit(code)
