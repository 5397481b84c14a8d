"""A stage command for the campaign tests (standard library only, runs with `python -S`).

    stage.py NAME OUTDIR [--sleep S] [--first-sleep S] [--fail-attempts N] [--fail-item ID]
                         [--marker PATH] [--barrier DIR --parties N]

Appends one JSON line per run to OUTDIR/runs.jsonl (stage, item, attempt, pid,
CUDA_VISIBLE_DEVICES, argv, start, end); exits 7 while the attempt number is <= N, or always for
item ID. With --marker, appends "ITEM PID" to PATH once it runs (so a test knows the stage has
started). --first-sleep replaces --sleep in attempt 1. With --barrier, waits (up to 60 s,
then exits 9) until N runs have entered DIR, so that N stages are known to run at once.
"""

import json
import os
import sys
import time


def main() -> int:
    args = sys.argv[1:]
    name, outdir = args[0], args[1]
    opts = {args[i]: args[i + 1] for i in range(2, len(args) - 1, 2)}
    start = time.time()
    item = os.environ.get("ACB_CAMPAIGN_ITEM", "")
    attempt = int(os.environ.get("ACB_CAMPAIGN_ATTEMPT", "0"))
    if "--marker" in opts:
        with open(opts["--marker"], "a") as fh:
            fh.write(f"{item} {os.getpid()}\n")
    if "--barrier" in opts:
        barrier, parties = opts["--barrier"], int(opts.get("--parties", "2"))
        os.makedirs(barrier, exist_ok=True)
        open(os.path.join(barrier, f"{item}-{os.getpid()}"), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(barrier)) < parties:
            if time.monotonic() > deadline:
                print(f"stage {name}: barrier of {parties} not met", file=sys.stderr)
                return 9
            time.sleep(0.02)
    sleep = opts.get("--first-sleep") if attempt == 1 else None
    time.sleep(float(sleep if sleep is not None else opts.get("--sleep", "0")))
    record = {
        "stage": name,
        "item": item,
        "attempt": attempt,
        "pid": os.getpid(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "start": start,
        "end": time.time(),
    }
    with open(os.path.join(outdir, "runs.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")
    if attempt <= int(opts.get("--fail-attempts", "0")) or item == opts.get("--fail-item"):
        print(f"stage {name} failing on purpose (item {item}, attempt {attempt})", file=sys.stderr)
        return 7
    return 0


if __name__ == "__main__":
    sys.exit(main())
