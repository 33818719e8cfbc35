"""Criteo click logs (Kaggle display-advertising and Terabyte TSV) for training.

Format: one sample per line, 40 tab-separated fields: the label (``0`` or ``1``), 13
integer features ``I1..I13`` (decimal, possibly negative, within the signed 64-bit range)
and 26 categorical features ``C1..C26`` (hexadecimal, 32-bit in the published data; up
to 64 bits are accepted). Every feature may be missing (an empty field); the label may
not.

Transformations (fixed; the cache header records the format version):

- dense value = ``log(1 + max(x, 0))`` computed in float64 and stored as float32; a
  missing or negative value gives 0.
- categorical row = ``splitmix64(int(value, 16)) % num_embeddings`` where
  ``splitmix64`` is SplitMix64's finaliser (golden-ratio increment, then the two
  multiply-xorshift rounds); a missing value maps to row :data:`MISSING_ROW` (0).
  The hash is the same for every table; only the modulus differs.

Reading is streamed in blocks of whole lines (``chunk_bytes`` at a time, 4 MiB by
default; a line over :data:`MAX_LINE_BYTES` is skipped as malformed without being held),
decoded in ``workers`` threads. Arrow's CSV reader (``pyarrow.csv``) splits each block
into fields and converts the integers; the labels and the hex values are checked and
decoded with numpy. :func:`parse_line` is the reference parser and has the last word:
lines Arrow's types cannot hold exactly (a hex value over 8 digits, an integer from 2**53
on) go through it, and a block Arrow refuses (a wrong field count, a value its integer
conversion rejects, ``+7`` included, or a byte where Arrow is more lenient than the
grammar: spaces, ``0x``, a byte-order mark, a lone ``\r``) is halved until the parts are
accepted or small enough to parse line by line, so each such line costs a few re-reads
of its block. Malformed lines are skipped and counted (the first few are kept
in the report), or raise :class:`CriteoFormatError` naming the file, line and field
when ``strict=True``.

Train/validation splits are line ranges: ``start`` and ``stop`` are 0-based line
indices, half-open like a Python slice (``start=0, stop=40_000_000`` is the first 40 M
lines); every line counts, malformed ones included. Error messages number lines from
1, as editors do.

The binary cache (:func:`build_cache`, :func:`open_or_build_cache`) is one file:
:data:`CACHE_MAGIC`, padding to 64 bytes, ``N`` fixed-size records (label float32,
dense float32[13], rows int32[26], or int64[26] when a table has more than 2**31 rows;
160 bytes a sample), then a JSON header, its length (uint64 little-endian) and
:data:`CACHE_MAGIC` again. It is written to a temporary file, fsynced and renamed into
place, so a reader sees either the old cache or the complete new one. The header holds
the source's size and mtime (not its path: a copy that keeps the mtime reuses the
cache), the table sizes, the line range and the format version; a cache that
disagrees with any of them is stale. A range that holds no sample (it starts beyond the
end of the file, or all its lines are malformed) is an error, and no cache is written.
Damage after writing is caught cheaply: opening checks that the header agrees with
itself and the file's size and checks the first and last :data:`CHECKED_RECORDS` records
(rows inside their tables, labels 0/1, dense values finite and >= 0); every batch and
row chunk read later is checked the same way. :class:`CriteoCacheError` then names the
file and says to delete it to rebuild it.
:class:`CriteoClicks` serves :class:`dlrm_runtime.data.Batch` objects from a cache by
batch index, like :class:`dlrm_runtime.data.SyntheticClicks`.

The package: :mod:`.format` (fields, transforms, :func:`parse_line`), :mod:`.reader`
(streamed, threaded parsing), :mod:`.cache` (the binary cache), :mod:`.clicks`
(batches from caches).
"""

from dlrm_runtime.data.criteo.cache import (
    CHECKED_RECORDS,
    CacheHeader,
    CriteoCache,
    SourceStamp,
    build_cache,
    open_or_build_cache,
    record_dtype,
)
from dlrm_runtime.data.criteo.clicks import CriteoClicks, cache_path, open_clicks, records_to_batch
from dlrm_runtime.data.criteo.format import (
    CACHE_DATA_OFFSET,
    CACHE_MAGIC,
    CACHE_VERSION,
    DEFAULT_CHUNK_BYTES,
    FIELD_NAMES,
    MAX_LINE_BYTES,
    MISSING_ROW,
    NUM_DENSE,
    NUM_FIELDS,
    NUM_SPARSE,
    CriteoCacheError,
    CriteoFormatError,
    ParsedLine,
    default_workers,
    dense_transform,
    hash_categorical,
    parse_line,
    splitmix64,
    table_sizes,
)
from dlrm_runtime.data.criteo.reader import CriteoReader, ParsedChunk, ParseReport

__all__ = [
    "CACHE_DATA_OFFSET", "CACHE_MAGIC", "CACHE_VERSION", "CHECKED_RECORDS", "CacheHeader",
    "CriteoCache", "CriteoCacheError", "CriteoClicks", "CriteoFormatError", "CriteoReader",
    "DEFAULT_CHUNK_BYTES", "FIELD_NAMES", "MAX_LINE_BYTES", "MISSING_ROW", "NUM_DENSE",
    "NUM_FIELDS", "NUM_SPARSE", "ParseReport", "ParsedChunk", "ParsedLine", "SourceStamp",
    "build_cache", "cache_path", "default_workers", "dense_transform", "hash_categorical",
    "open_clicks", "open_or_build_cache", "parse_line", "record_dtype", "records_to_batch", "splitmix64",
    "table_sizes",
]
