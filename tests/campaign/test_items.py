"""Items from FASTA: ids from headers, sanitised; duplicates and bad input named by file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from acb_slurm.campaign.errors import SpecError
from acb_slurm.campaign.items import read_items, sanitize_id


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("sp|P69905|HBA_HUMAN Hemoglobin subunit alpha", "sp_P69905_HBA_HUMAN"),
        ("1abc_A  chain A", "1abc_A"),
        ("../../etc/passwd", "etc_passwd"),
        ("name;rm -rf /", "name_rm"),
        ("'quoted'", "quoted"),
        ("...", ""),
    ],
)
def test_ids_are_safe_file_names(header: str, expected: str) -> None:
    assert sanitize_id(header) == expected


def test_a_file_gives_one_item_per_sequence(tmp_path: Path) -> None:
    path = tmp_path / "x.fasta"
    path.write_text(">a first\nMKV\nLLA\n\n>b|2 second\nGG:HH\n>...\nWW\n")
    items = read_items(path)
    assert [(i.id, i.sequence, i.line) for i in items] == [
        ("a", "MKVLLA", 1),
        ("b_2", "GG:HH", 5),
        ("item3", "WW", 7),
    ]
    assert items[0].fasta() == ">a first\nMKVLLA\n"


def test_a_directory_reads_every_fasta_file_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.fa").write_text(">y\nMK\n")
    (tmp_path / "a.fasta").write_text(">x\nMK\n>z\nMK\n")
    (tmp_path / "notes.txt").write_text("not fasta")
    assert [i.id for i in read_items(tmp_path)] == ["x", "z", "y"]


def test_duplicate_ids_name_both_places(tmp_path: Path) -> None:
    path = tmp_path / "x.fasta"
    path.write_text(">p1 one\nMK\n>p1 two\nMK\n")
    with pytest.raises(SpecError) as info:
        read_items(path)
    assert info.value.line == 3
    assert f"{path}:1" in str(info.value) and "unique" in str(info.value)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("MKV\n>a\nMK\n", 1, "before the first '>'"),
        (">a\nMK1V\n", 2, "unexpected characters '1'"),
        (">a\n>b\nMK\n", 1, "is empty"),
    ],
)
def test_bad_fasta_is_named_by_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = tmp_path / "x.fasta"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        read_items(path)
    assert info.value.line == line
    assert words in str(info.value)


def test_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no FASTA files"):
        read_items(tmp_path)
