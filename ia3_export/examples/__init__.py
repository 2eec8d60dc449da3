"""The embedded default: the demo, tiny models built from configs, the shipped data."""
