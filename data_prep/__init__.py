"""data_prep: raw UK Biobank cine + tabular and raw multi-coil k-space -> WebDataset shards + a Zarr store.

- `sources/`            readers of the raw inputs (ukbb_cardiac NIfTI, UK Biobank DICOM zips, k-space .mat)
- `preprocess_ukb`, `phenotypes`, `tabular`, `ukb_fields`   one UK Biobank subject -> one sample
- `preprocess_kspace`, `mri`                                one k-space file -> one sequence sample
- `jobs/`               the Ray conversion jobs (engine: blocks, quarantine, counts, incremental runs)
- `splits`              train / val / test assignment (stable hash; stratified over groups)
- `synth/`              the synthetic cohort in the real layouts
The sample format, the manifest and the config system it writes with are in `core`.
"""
