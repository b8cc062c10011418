"""Reports rendered from results.json alone: Markdown, HTML and summary figures."""
