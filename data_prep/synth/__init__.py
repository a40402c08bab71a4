"""Synthetic UK Biobank / CMRxRecon cohort in the real on-disk layouts."""
