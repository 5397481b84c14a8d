"""Items of a campaign: one per FASTA sequence, from a file or a directory of files.

An item's id comes from the first word of its header, sanitised to a safe file name; two items
with the same id are an error that names both places, because results are kept per id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from acb_slurm.campaign.errors import SpecError

FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fna", ".seq")
MAX_ID_LENGTH = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Residue letters, gaps, stop, and ':' which ColabFold uses to separate the chains of a complex.
_SEQUENCE = re.compile(r"^[A-Za-z*\-:]+$")


@dataclass(frozen=True, slots=True)
class Item:
    """One sequence to process. `source:line` is where its header is."""

    id: str
    header: str
    sequence: str
    source: Path
    line: int

    def fasta(self) -> str:
        """The item as a one-record FASTA text (the header kept as written)."""
        body = "\n".join(self.sequence[i : i + 60] for i in range(0, len(self.sequence), 60))
        return f">{self.header}\n{body}\n"


def sanitize_id(header: str) -> str:
    """The item id for a FASTA header: its first word with unsafe characters replaced by '_'.

    "sp|P69905|HBA_HUMAN Hemoglobin" -> "sp_P69905_HBA_HUMAN". Returns "" when nothing usable is
    left (the caller then numbers the item).
    """
    words = header.strip().split()
    word = words[0] if words else ""
    safe = _UNSAFE.sub("_", word).strip("._")
    return safe[:MAX_ID_LENGTH]


def _parse_file(path: Path, start_index: int) -> list[Item]:
    items: list[Item] = []
    header: str | None = None
    header_line = 0
    chunks: list[str] = []

    def finish() -> None:
        if header is None:
            return
        sequence = "".join(chunks)
        if not sequence:
            raise SpecError(
                path, header_line, "items", f"sequence {header!r} is empty; remove the header"
            )
        item_id = sanitize_id(header) or f"item{start_index + len(items) + 1}"
        items.append(Item(item_id, header, sequence, path, header_line))

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(path, None, "items", f"cannot read FASTA file: {exc}") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            finish()
            header, header_line, chunks = line[1:].strip(), number, []
            continue
        if header is None:
            raise SpecError(
                path, number, "items", "sequence data before the first '>' header; not FASTA?"
            )
        compact = "".join(line.split())
        if not _SEQUENCE.match(compact):
            bad = sorted(set(re.sub(r"[A-Za-z*\-:]", "", compact)))
            raise SpecError(
                path,
                number,
                "items",
                f"unexpected characters {''.join(bad)!r} in the sequence of {header!r}",
            )
        chunks.append(compact.upper())
    finish()
    return items


def read_items(path: Path | str) -> list[Item]:
    """All items of a FASTA file, or of every FASTA file of a directory (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FASTA_SUFFIXES)
        if not files:
            raise SpecError(
                path, None, "items", f"no FASTA files ({', '.join(FASTA_SUFFIXES)}) in directory"
            )
    elif path.is_file():
        files = [path]
    else:
        raise SpecError(path, None, "items", "does not exist; give a FASTA file or a directory")
    items: list[Item] = []
    for file in files:
        items.extend(_parse_file(file, len(items)))
    if not items:
        raise SpecError(path, None, "items", "no sequences found")
    seen: dict[str, Item] = {}
    for item in items:
        other = seen.get(item.id)
        if other is not None:
            raise SpecError(
                item.source,
                item.line,
                "items",
                f"item id {item.id!r} (from header {item.header!r}) is also the id of "
                f"{other.source}:{other.line} ({other.header!r}); make the first words of the "
                "headers unique",
            )
        seen[item.id] = item
    return items
