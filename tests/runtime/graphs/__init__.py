"""Graph files for the runtime tests (loaded by path by every tier process)."""
