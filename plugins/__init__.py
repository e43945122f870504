"""First-party non-kernel plugins (checkpoint formats, weight sources, hybrids)."""
