"""Event logs of one or two runs → a timeline PNG, a summary table and a self-contained HTML."""

from acb_slurm.report.build import ReportPaths, build_report
from acb_slurm.report.events import EventLogError, Run, build_run
from acb_slurm.report.summary import Summary, summarize

__all__ = [
    "EventLogError",
    "ReportPaths",
    "Run",
    "Summary",
    "build_report",
    "build_run",
    "summarize",
]
