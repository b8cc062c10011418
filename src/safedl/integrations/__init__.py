"""Adapters that bring other libraries' components into safedl's registry (each behind its own optional extra)."""
