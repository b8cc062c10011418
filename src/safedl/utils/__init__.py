"""Small shared helpers: validation, statistics, tensors, files."""
