"""Ray conversion jobs: raw sources -> WebDataset shards + Zarr store + manifest."""
