"""Rendering at the edge: rich tables for the terminal, JSON dicts, pandas frames and CSV.

The engine (estimate, plan, plot, verify) returns typed results and never imports this
package; the command line (vramplan.cli) and the Python API call it to show them.

- vramplan.report.estimate: one estimate, the strategy comparison
- vramplan.report.plan: the plan table, its JSON, its DataFrame (and so CSV)
- vramplan.report.catalog: bundled model presets, GPU profiles, the GPUs NVML sees
"""

from __future__ import annotations

from vramplan.units import GiB


def gib_cell(n: int | float) -> str:
    """Bytes as a GiB table cell: 1,234.56."""
    return f"{n / GiB:,.2f}"
