"""The on-disk format: sample codec, compression, shard index, manifest, tar and
webdataset members. No torch, no network, no reader.
"""
