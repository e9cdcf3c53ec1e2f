"""Offline real-scan datasets (Colin27/AAL from mricron-data, MNI152 from nilearn) with synthetic variation.

See ``builders`` (entry points), ``sources`` (where the real volumes come from) and ``variation``.
"""
