"""data_prep: raw UK Biobank cine + tabular and raw multi-coil k-space -> WebDataset shards + a Zarr store.

- `ukb/`      the UK Biobank pipeline: readers (NIfTI, DICOM zips), preprocessing, phenotypes, the field
              catalogue, the tabular features and disease labels, the conversion job
- `kspace/`   the k-space pipeline: the published layouts and MAT reading, reconstruction, preprocessing and
              metadata sentences, the conversion job
- `engine`    what every conversion job shares on Ray: blocks, quarantine, counts that reconcile, incremental runs
- `splits`    train / val / test assignment (a stable hash; stratified over groups)
- `synth/`    the synthetic cohort, written in the real layouts
The sample format, the manifest and the config system it writes with are in `core`.
"""
