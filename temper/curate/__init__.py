"""Data curation: normalisation, exact and MinHash deduplication, quality and repetition filters,
PII masking and decontamination (`temper curate`; the pipeline is in `pipeline.py`)."""
