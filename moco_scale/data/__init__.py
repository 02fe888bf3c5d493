"""Shards, augmentations and the two-view loaders."""
