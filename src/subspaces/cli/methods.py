"""``subspaces methods``: the registries as a table."""
from __future__ import annotations

from . import app
from ._common import new_console


@app.command("methods")
def methods() -> None:
    """List every method: family, name, paper and implementation status."""
    from rich.table import Table

    from .._registry import list_methods

    table = Table("family", "name", "paper", "status")
    rows = list_methods()
    for row in rows:
        table.add_row(row["family"], row["name"], row["paper"], row["status"])
    console = new_console()
    console.print(table)
    for row in rows:
        if row["note"]:
            console.print(f"[bold]{row['name']}[/] ({row['status']}): {row['note']}")
