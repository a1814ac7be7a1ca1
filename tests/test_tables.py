"""utils/tables.py: the one Markdown table writer and the one atomic CSV writer, against hand-written text."""
import pytest

from utils.tables import markdown_row, markdown_table, write_csv


def test_markdown_table_default_separator():
    lines = markdown_table(["backbone", "ms", "note"], [["BRN", 1.5, None], ["IDT", 12, ""]])
    assert lines == [
        "| backbone | ms | note |",
        "|---|---|---|",
        "| BRN | 1.5 | None |",
        "| IDT | 12 |  |",
    ]


def test_markdown_table_alignment_markers():
    lines = markdown_table(["a", "b", "c", "d"], [["x", 1, 2, 3]], align=[None, "left", "right", "center"])
    assert lines == ["| a | b | c | d |", "|---|:---|---:|:---:|", "| x | 1 | 2 | 3 |"]


def test_markdown_table_header_only_then_rows_one_at_a_time():
    header = markdown_table(["case", "wall s"], [])
    assert header == ["| case | wall s |", "|---|---|"]
    assert markdown_row(["plain", "1.50"]) == "| plain | 1.50 |"
    # a generator of rows is read once, cells as given (no escaping of "|")
    assert markdown_table(["k"], ([c] for c in ["a|b", "\\|"]))[2:] == ["| a|b |", "| \\| |"]


def test_markdown_table_rejects_bad_alignment():
    with pytest.raises(ValueError, match="2 entries for 3 columns"):
        markdown_table(["a", "b", "c"], [], align=[None, "right"])
    with pytest.raises(ValueError, match="'---:'"):
        markdown_table(["a"], [], align=["---:"])


def test_write_csv_is_csv_writer_dialect(tmp_path):
    path = tmp_path / "sub" / "t.csv"
    write_csv(path, ["name", "value"], [["a,b", "1.0000"], ["c", ""]])
    assert path.read_bytes() == b'name,value\r\n"a,b",1.0000\r\nc,\r\n'
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]  # no temporary file left behind
