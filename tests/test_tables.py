"""tables.py: the one text-table printer."""

from wflw_pipeline import tables


def test_format_table_aligns_columns():
    table = tables.format_table(["a", "bb"], [[1.0, None], ["long", 12345.0]]).splitlines()
    assert table[0] == "| a    | bb     |"
    assert table[2] == "| 1    | n/a    |"
    assert table[3] == "| long | 12,345 |"
