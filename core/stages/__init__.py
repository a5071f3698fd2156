"""One module per pipeline stage, each a plain function the flows and the CLI call (core/stagetable.py)."""
