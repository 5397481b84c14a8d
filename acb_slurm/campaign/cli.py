"""`acb-campaign`: run a campaign worker, show a campaign's status, reset failed items.

Thin: options are parsed here and handed to plain functions; a CampaignError becomes one message
on stderr and exit code 1, without a traceback.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from acb_slurm import env
from acb_slurm.campaign.errors import CampaignError
from acb_slurm.campaign.items import read_items
from acb_slurm.campaign.progress import format_duration, format_snapshot, snapshot
from acb_slurm.campaign.spec import CampaignSpec, json_schema, load_spec
from acb_slurm.campaign.store import ResultsStore
from acb_slurm.units import format_size

#: Set by acb-sbatch from job.yaml's `campaign:`; the default campaign file.
CAMPAIGN_ENV = env.CAMPAIGN

HELP = """\
Run many items (FASTA sequences) through CPU and GPU stages over many workers.

Workers claim items from the campaign's results directory, so any number of them, in one job or
in the tasks of a job array, share one campaign; a rerun skips finished items.

\b
Examples:
    acb-campaign check campaign.yaml          # validate; print what would run
    acb-campaign worker campaign.yaml         # one worker (a job.yaml runs many, mode: client)
    acb-campaign status campaign.yaml         # done / failed / running, rate, ETA
    acb-campaign reset-failed campaign.yaml   # let the next workers retry failed items
    acb-campaign schema > campaign.schema.json   # JSON Schema of campaign files for editors
See examples/alphafold2/.
"""

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=HELP, rich_markup_mode=None,
)  # fmt: skip

CampaignArg = Annotated[
    Path | None,
    typer.Argument(help=f"campaign file (YAML); default: ${CAMPAIGN_ENV}", show_default=False),
]


def _spec(path: Path | None) -> CampaignSpec:
    if path is None:
        value = os.environ.get(CAMPAIGN_ENV)
        if not value:
            raise CampaignError(
                f"no campaign file given: pass one (acb-campaign worker campaign.yaml) or set "
                f"{CAMPAIGN_ENV} (job.yaml `campaign:` does)"
            )
        path = Path(value)
    return load_spec(path)


def _fail(exc: CampaignError) -> typer.Exit:
    typer.echo(f"acb-campaign: error: {exc}", err=True)
    return typer.Exit(1)


@app.command()
def worker(
    campaign: CampaignArg = None,
    name: Annotated[
        str | None, typer.Option(help="worker name in logs and status (default: $ACB_WORKER)")
    ] = None,
    max_items: Annotated[
        int | None, typer.Option(min=1, help="stop after finishing this many items")
    ] = None,
    progress: Annotated[
        bool, typer.Option(help="show progress (one live line on a terminal, else periodic)")
    ] = True,
) -> None:
    """Claim items and run their stages until none is left."""
    from acb_slurm.campaign.runner import Worker

    try:
        spec = _spec(campaign)
        runner = Worker(spec, name=name, max_items=max_items, progress=progress)
        runner.install_signal_handlers()
        summary = runner.run()
    except CampaignError as exc:
        raise _fail(exc) from None
    raise typer.Exit(summary.exit_code)


def status_data(spec: CampaignSpec) -> dict[str, Any]:
    """Everything `status` shows, as plain data."""
    store = ResultsStore(spec.results, spec.stale_after_s)
    items = read_items(spec.items)
    ids = [i.id for i in items]
    snap = snapshot(store, ids)
    done_ids, failed_ids, claimed = store.counts()
    failed = store.failed_records()
    running = []
    for item_id in sorted((claimed & set(ids)) - done_ids - failed_ids):
        info = store.read_claim(item_id)
        if info is None or info.finished:  # a tombstone whose record is not visible yet
            continue
        state = store.read_state(item_id) or {}
        running.append(
            {
                "item": item_id,
                "worker": info.data.get("worker", "?"),
                "host": info.data.get("host", "?"),
                "pid": info.data.get("pid"),
                "stage": state.get("stage", "?"),
                "since": info.data.get("claimed_at"),
                "stale": store.is_stale(info),
            }
        )
    return {
        "campaign": spec.name,
        "results": str(spec.results),
        "total": snap.total,
        "done": snap.done,
        "failed": snap.failed,
        "running": snap.running,
        "pending": snap.pending,
        "rate_per_hour": snap.rate_per_hour,
        "eta_s": snap.eta_s,
        "line": format_snapshot(spec.name, snap),
        "running_items": running,
        "failed_items": [{"item": k, **v} for k, v in sorted(failed.items()) if k in set(ids)],
    }


@app.command()
def status(
    campaign: CampaignArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Done, failed, running and pending items, rate and ETA."""
    try:
        data = status_data(_spec(campaign))
    except CampaignError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    typer.echo(data["line"])
    now = time.time()
    if data["running_items"]:
        typer.echo("running:")
        for r in data["running_items"]:
            age = format_duration(now - r["since"]) if r["since"] else "?"
            stale = (
                "  (stale: its worker is gone; the next worker takes it over)" if r["stale"] else ""
            )
            typer.echo(
                f"  {r['item']}  stage {r['stage']}  {r['worker']} (pid {r['pid']} on "
                f"{r['host']})  {age}{stale}"
            )
    if data["failed_items"]:
        typer.echo("failed:")
        for f in data["failed_items"]:
            typer.echo(
                f"  {f['item']}  after {f.get('attempts')} attempts: {f.get('error')}  "
                f"log: {f.get('log')}"
            )


@app.command("reset-failed")
def reset_failed(campaign: CampaignArg = None) -> None:
    """Forget failed records so the next workers try those items again."""
    try:
        spec = _spec(campaign)
    except CampaignError as exc:
        raise _fail(exc) from None
    reset = ResultsStore(spec.results).reset_failed()
    typer.echo(f"reset {len(reset)} failed item(s)" + (f": {', '.join(reset)}" if reset else ""))


@app.command()
def check(campaign: CampaignArg = None) -> None:
    """Validate the campaign file and its items; print what would run."""
    try:
        spec = _spec(campaign)
        items = read_items(spec.items)
    except CampaignError as exc:
        raise _fail(exc) from None
    typer.echo(f"campaign {spec.name}: {len(items)} items from {spec.items}")
    typer.echo(f"results: {spec.results}; retries: {spec.retries}")
    for stage in spec.stages:
        what = stage.device.value
        if stage.device.value == "gpu":
            memory = format_size(stage.memory_bytes) if stage.memory_bytes else "whole GPU"
            what += f" ({stage.mode.value}, {stage.gpus} GPU, memory {memory}"
            what += f", up to {stage.batch} items a process)" if stage.batch > 1 else ")"
        typer.echo(f"  stage {stage.name} [{what}]: {list(stage.command)}")


@app.command()
def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of campaign files, for editors and CI checks.

    Example: acb-campaign schema > campaign.schema.json
    """
    typer.echo(json.dumps(json_schema(), indent=2))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="acb-campaign")


if __name__ == "__main__":  # pragma: no cover
    main()
