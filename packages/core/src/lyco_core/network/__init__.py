"""Attaching adapters to torch models: one wrapper per layer, networks of them, and module selection."""
