"""`python -m acb_slurm.report LOG... [--compare LOG...] [--out DIR]`: build a report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from acb_slurm.report.build import build_report
from acb_slurm.report.events import EventLogError
from acb_slurm.report.summary import render_table


def main(argv: list[str] | None = None) -> int:
    """Build the report and print its summary table; 1 on unreadable logs."""
    parser = argparse.ArgumentParser(
        prog="python -m acb_slurm.report",
        description="Timeline PNG, summary table and HTML from assigner event logs.",
    )
    parser.add_argument(
        "logs", nargs="+", type=Path, help="event logs of one run (files or directories)"
    )
    parser.add_argument(
        "--compare", nargs="+", type=Path, help="event logs of a second run, drawn beside it"
    )
    parser.add_argument("--out", type=Path, default=Path("report"), help="output directory")
    parser.add_argument("--names", nargs="+", help="labels of the runs (e.g. static shared)")
    parser.add_argument("--title", default="acb-slurm GPU timeline")
    args = parser.parse_args(argv)
    try:
        paths = build_report(args.logs, args.out, args.compare, names=args.names, title=args.title)
    except (EventLogError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render_table(json.loads(paths.summary.read_text(encoding="utf-8"))))
    print(f"wrote {paths.png}\nwrote {paths.html}\nwrote {paths.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
