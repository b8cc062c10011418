"""Data-side defenses: cleansers that find poisoned training samples."""
