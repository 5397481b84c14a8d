"""Campaign runner: many items (protein sequences) over many workers, with claims that are safe
across the tasks of a Slurm job array, resume, bounded retries and progress."""

from acb_slurm.campaign.errors import CampaignError, SpecError
from acb_slurm.campaign.items import Item, read_items
from acb_slurm.campaign.spec import CampaignSpec, Stage, load_spec

__all__ = [
    "CampaignError",
    "CampaignSpec",
    "Item",
    "SpecError",
    "Stage",
    "load_spec",
    "read_items",
]
