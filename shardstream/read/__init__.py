"""Opening and reading datasets without torch: sources, the epoch order, block
reads, mixtures, shard lists, verification and the process world.
"""
