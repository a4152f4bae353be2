"""Searches that run the pipeline many times: the exclusion search behind attribution."""
