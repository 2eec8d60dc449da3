"""The IA3 method itself: config, layers, the wrapped model, merging, loading models."""
