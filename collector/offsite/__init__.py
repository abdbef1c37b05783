"""Off-site copies: every stored backup, age-encrypted, in S3-compatible object storage,
with its state kept on disk, a background copier, and recovery from the bucket.
"""
