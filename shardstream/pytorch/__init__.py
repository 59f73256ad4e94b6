"""The PyTorch layer, the only place torch is imported: ShardStream, ShardDataset,
collation, the worker wire, the loader and the CUDA prefetcher.
"""
