"""Local files, object stores, retries and the node cache. Knows the format's
file names, nothing about readers or torch.
"""
