"""Workflows: what `optimize run`, `optimize bench` and `optimize tune` do, as library calls.

Each workflow takes a typed request, reports progress through a listener (never by printing) and returns a
report whose `to_dict()` is exactly the command's `--json` document. The CLI only parses, calls and renders.
"""
