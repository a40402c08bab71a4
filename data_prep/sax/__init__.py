"""Cine short-axis segmentation benchmarks as published (ACDC, M&Ms): readers (`acdc`, `mnms`) that map both label
conventions to the project's, and the conversion job (`job`) into the shared shard / Zarr / manifest format."""
