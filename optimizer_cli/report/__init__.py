"""Reports: rich tables, JSON, Markdown, gates and baseline comparison."""
