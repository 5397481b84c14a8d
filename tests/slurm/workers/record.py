"""Test worker: writes what it was given (argv, environment) as JSON, then holds for a moment.

ACB_TEST_RECORD names the directory to write into; ACB_TEST_SLEEP the seconds to hold;
ACB_TEST_EXIT the exit code to end with (a crashing worker).
"""

from __future__ import annotations

import json
import os
import sys
import time

started = time.time()
time.sleep(float(os.environ.get("ACB_TEST_SLEEP", "0.3")))
record = {
    "argv": sys.argv[1:],
    "worker": os.environ.get("ACB_WORKER"),
    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "node": os.environ.get("SLURMD_NODENAME"),
    "assigner": os.environ.get("ACB_ASSIGNER"),
    "hostile": os.environ.get("HOSTILE"),
    "acb": {k: v for k, v in os.environ.items() if k.startswith("ACB_")},
    "started": started,
    "ended": time.time(),
    "pid": os.getpid(),
}
out = os.environ["ACB_TEST_RECORD"]
with open(os.path.join(out, f"{os.getpid()}.json"), "w", encoding="utf-8") as fh:
    json.dump(record, fh)
sys.exit(int(os.environ.get("ACB_TEST_EXIT", "0")))
