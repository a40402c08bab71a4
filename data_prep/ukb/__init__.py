"""The UK Biobank pipeline, in one place: raw cine (ukbb_cardiac NIfTI folders or the bulk DICOM zips of fields
20209 / 20208) and the tabular showcase export -> one sample per subject.

- `study`       `CineStudy`, one subject's cine planes whatever the source
- `nifti`, `dicom`   the two readers
- `preprocess`  a study -> the stored sample (planes, frames, crop, labels in one space, phenotypes)
- `phenotypes`  cardiac volumes, mass and function measured from segmentations
- `fields`      the UK Biobank field catalogue (ids, instances, codings, special codes)
- `feature_spec`  the tabular feature spec (configs/data_prep/ukb_features.yaml, read by the config system)
- `csv_export`  the tabular CSV export reader (real-export quirks counted in a report)
- `features`    Stage II feature extraction, training-split statistics, encoding, the feature schema
- `diseases`    the disease labels (ICD-10 + self-report)
- `job`         the Ray conversion job (`python -m data_prep ukb`)
"""
