"""Reading the Markdown tables the package prints (tables.format_table) back as cells."""

from __future__ import annotations


def tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of `text`, each as its rows of stripped cells (separator rows left out)."""
    found, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= {"-"} for cell in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def rows(text: str) -> list[list[str]]:
    """Every row of every Markdown table of `text`, in order."""
    return [row for table in tables(text) for row in table]
