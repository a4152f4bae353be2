"""Graph analyses used by passes (channel dependency groups, layer importance)."""
