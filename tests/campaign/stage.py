"""A stage command for the campaign tests (standard library only, runs with `python -S`).

    stage.py NAME OUTDIR... [--sleep S] [--first-sleep S] [--fail-attempts N] [--fail-item ID]
                            [--marker PATH] [--barrier DIR --parties N] [--slow-item ID]
                            [--no-output ID] [--crash-attempts N] [--items-dir DIR]

One process may run for several items (a batch stage: one OUTDIR per item, their ids and
attempts space-separated in ACB_CAMPAIGN_ITEM and ACB_CAMPAIGN_ATTEMPT). Appends one JSON line
per item to its OUTDIR/runs.jsonl (stage, item, attempt, the process's items, pid,
CUDA_VISIBLE_DEVICES, argv, cwd, start, end; with --items-dir, that directory's entries and
their targets) and writes OUTDIR/NAME.out, except in attempt 1 of the item --no-output names.
Exits 7 while an attempt number is <= N, or always for item ID (--fail-item); kills itself with
SIGKILL while an attempt number is <= --crash-attempts. With --marker, appends "ITEMS PID" to
PATH once it runs (so a test knows the stage has started). --first-sleep replaces --sleep in
attempt 1; --slow-item sleeps 60 s for that item. With --barrier, waits (up to 60 s, then exits
9) until N runs have entered DIR, so that N stages are known to run at once.
"""

import json
import os
import signal
import sys
import time


def main() -> int:
    args = sys.argv[1:]
    name = args[0]
    first_option = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    outdirs = args[1:first_option]
    opts = {args[i]: args[i + 1] for i in range(first_option, len(args) - 1, 2)}
    start = time.time()
    items = os.environ.get("ACB_CAMPAIGN_ITEM", "").split() or [""]
    attempts = [int(a) for a in os.environ.get("ACB_CAMPAIGN_ATTEMPT", "0").split()]
    if "--marker" in opts:
        with open(opts["--marker"], "a") as fh:
            fh.write(f"{','.join(items)} {os.getpid()}\n")
    if "--barrier" in opts:
        barrier, parties = opts["--barrier"], int(opts.get("--parties", "2"))
        os.makedirs(barrier, exist_ok=True)
        open(os.path.join(barrier, f"{items[0]}-{os.getpid()}"), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(barrier)) < parties:
            if time.monotonic() > deadline:
                print(f"stage {name}: barrier of {parties} not met", file=sys.stderr)
                return 9
            time.sleep(0.02)
    sleep = opts.get("--first-sleep") if min(attempts) == 1 else None
    if opts.get("--slow-item") in items:
        sleep = "60"
    time.sleep(float(sleep if sleep is not None else opts.get("--sleep", "0")))
    listing = {}
    if "--items-dir" in opts:
        directory = opts["--items-dir"]
        listing = {e: os.readlink(os.path.join(directory, e)) for e in os.listdir(directory)}
    if min(attempts) <= int(opts.get("--crash-attempts", "0")):
        print(f"stage {name} crashing on purpose (items {items})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    for item, attempt, outdir in zip(items, attempts, outdirs, strict=True):
        record = {
            "stage": name,
            "item": item,
            "attempt": attempt,
            "items": items,
            "pid": os.getpid(),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "argv": sys.argv[1:],
            "cwd": os.getcwd(),
            "start": start,
            "end": time.time(),
            "items_dir": listing,
        }
        with open(os.path.join(outdir, "runs.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if not (item == opts.get("--no-output") and attempt == 1):
            with open(os.path.join(outdir, f"{name}.out"), "w") as fh:
                fh.write("ok\n")
    print(f"stage {name} ran for {' '.join(items)}")
    if min(attempts) <= int(opts.get("--fail-attempts", "0")) or opts.get("--fail-item") in items:
        print(
            f"stage {name} failing on purpose (items {items}, attempts {attempts})", file=sys.stderr
        )
        return 7
    return 0


if __name__ == "__main__":
    sys.exit(main())
