"""Developer commands: ``python -m tools.<name>`` from the repository root (not shipped in the wheel)."""
