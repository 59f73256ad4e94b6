"""Packing: input files -> samples -> blocks -> shards, published atomically."""
