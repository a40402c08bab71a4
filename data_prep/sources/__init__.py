"""Readers for raw source formats (UK Biobank DICOM zips, ...) used by the conversion jobs."""
