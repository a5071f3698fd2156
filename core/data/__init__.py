"""Data plumbing every modality shares: files, shards, batching, and the embedded default dataset."""
