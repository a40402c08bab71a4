"""The raw k-space pipeline (CMRxRecon 2023/2024/2025, MMCMR-427K), in one place: one multi-coil `.mat` file ->
one sequence sample with its acquisition metadata and MetaCLIP-CMR sentences.

- `source`      the published folder layout, metadata from the path, MAT-file reading (v5 and v7.3)
- `mri`         centred FFTs and coil combination
- `preprocess`  one file -> reconstructed, resized, z-scored images + metadata sentences
- `job`         the Ray conversion job (`python -m data_prep kspace`)
"""
