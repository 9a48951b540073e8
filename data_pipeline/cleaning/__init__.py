"""Data cleaning: exact and MinHash-LSH near-duplicate removal, and personal-data scrubbing.

Pure functions for the pipeline (`encode_stories.py --dedup --scrub_pii` calls them) and two
scripts, `dedup.py` and `scrub_pii.py`, for files of `<|endoftext|>`-separated documents.
"""
from data_pipeline.cleaning.dedup import exact_dedup, find_near_duplicates, near_dedup
from data_pipeline.cleaning.documents import read_documents, write_documents
from data_pipeline.cleaning.scrub_pii import scrub_pii

__all__ = ["exact_dedup", "near_dedup", "find_near_duplicates", "scrub_pii", "read_documents", "write_documents"]
