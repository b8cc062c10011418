"""Diagnostics that inspect data or models without changing them."""
