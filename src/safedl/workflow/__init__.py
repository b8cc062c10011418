"""Safe-DL's defense workflow on a finished run: choose defenses per attack (``safedl defend``) and export
per-defense results in Safe-DL's layout (``safedl export-results``)."""
