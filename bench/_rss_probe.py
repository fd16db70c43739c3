"""Run a command, pass its output through, then print one JSON line: its peak RSS.

The peak is that of the largest process in the command's tree (Linux reports the maximum
over the waited-for descendants), in MiB.
"""

import json
import os
import subprocess
import sys

proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
code = os.waitstatus_to_exitcode(status)
sys.stdout.flush()
print(json.dumps({"exit": code, "maxrss_mib": round(usage.ru_maxrss / 1024, 1)}))
sys.exit(code)
