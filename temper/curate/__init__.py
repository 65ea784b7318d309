"""Data curation: normalisation, exact and MinHash deduplication, quality and repetition filters,
PII masking and decontamination (`temper curate`; the pipeline is in `pipeline.py`)."""

from temper.errors import TemperError

try:
    import xxhash
except ImportError:  # an optional extra: say which
    raise TemperError("temper curate needs xxhash for its content and shingle hashes: pip install 'temper[curate]' "
                      "(or pip install xxhash)") from None

__all__ = ["xxhash"]
