"""Criteo TSV parsing (fast path against the reference parser), hashing, line ranges,
malformed lines, the binary cache (round trip, staleness, atomic writes) and batches."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dlrm_runtime.data import criteo
from dlrm_runtime.data.criteo import cache as criteo_cache
from dlrm_runtime.data.criteo import reader as criteo_reader
from dlrm_runtime.data.criteo import (
    MISSING_ROW,
    CriteoCache,
    CriteoCacheError,
    CriteoClicks,
    CriteoFormatError,
    CriteoReader,
    build_cache,
    dense_transform,
    hash_categorical,
    open_or_build_cache,
    parse_line,
    record_dtype,
    table_sizes,
)
from dlrm_runtime.data import VALIDATION_OFFSET
from dlrm_runtime.errors import ConfigError
from planner import parse_tables

SIZES = tuple(50 + 37 * i for i in range(26))
MASK64 = (1 << 64) - 1


def _splitmix64_reference(x: int) -> int:
    """SplitMix64's finaliser written out with Python integers."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _row(text: str, size: int) -> int:
    return MISSING_ROW if text == "" else _splitmix64_reference(int(text, 16)) % size


def _line(label: str = "1", ints: list[str] | None = None, cats: list[str] | None = None) -> str:
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{0x1000 * i + 7:08x}" for i in range(26)]
    return "\t".join([label, *ints, *cats])


def _write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_bytes("".join(line + end for line in lines).encode())
    return path


def _read_all(reader: CriteoReader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    chunks = list(reader)
    if not chunks:
        return np.zeros(0, np.float32), np.zeros((0, 13), np.float32), np.zeros((0, 26), np.int64)
    return (np.concatenate([c.labels for c in chunks]), np.concatenate([c.dense for c in chunks]),
            np.concatenate([c.rows for c in chunks]))


def _random_lines(n: int, seed: int) -> list[str]:
    """Valid lines exercising both paths: missing values, signs, long integers, upper
    and lower case hex, hex longer than 8 digits."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = []
        for _ in range(13):
            kind = rng.integers(0, 10)
            if kind == 0:
                ints.append("")
            elif kind == 1:
                ints.append(str(-int(rng.integers(0, 10 ** int(rng.integers(1, 9))))))
            elif kind == 2:
                ints.append(str(int(rng.integers(0, 2 ** 63 - 1)) // 10 ** int(rng.integers(0, 19))))
            elif kind == 3:
                ints.append("+" + str(int(rng.integers(0, 1000))))
            else:
                ints.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 9))))))
        cats = []
        for _ in range(26):
            kind = rng.integers(0, 10)
            if kind == 0:
                cats.append("")
            elif kind == 1:
                cats.append(f"{int(rng.integers(0, 2 ** 63)):x}")  # up to 16 digits
            elif kind == 2:
                cats.append(f"{int(rng.integers(0, 2 ** 32)):08X}")
            else:
                cats.append(f"{int(rng.integers(0, 16 ** int(rng.integers(1, 9)))):x}")
        lines.append(_line(str(int(rng.integers(0, 2))), ints, cats))
    return lines


# ---------------------------------------------------------------- values


def test_hash_is_splitmix64_modulo_rows_and_in_range() -> None:
    values = [0, 1, 0xDEADBEEF, 0xFFFFFFFF, MASK64]
    for size in (1, 7, 1000, 2 ** 31 + 11):
        rows = hash_categorical(values, size)
        assert rows.dtype == np.int64
        assert rows.tolist() == [_splitmix64_reference(v) % size for v in values]
        assert ((rows >= 0) & (rows < size)).all()
    per_table = hash_categorical([[5, 5, 5]], [3, 10, 1000])
    assert per_table.tolist() == [[_splitmix64_reference(5) % n for n in (3, 10, 1000)]]
    assert hash_categorical([5], 1000).tolist() == hash_categorical([5], 1000).tolist()


def test_dense_transform_clamps_negatives_and_missing() -> None:
    out = dense_transform([0, 1, -5, math.nan, 1e30])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, math.log(2), 0.0, 0.0, math.log1p(1e30)], rtol=1e-6)


def test_parse_line_decodes_every_kind_of_value() -> None:
    ints = ["", "0", "5", "-3", str(2 ** 63 - 1), str(2 ** 53 + 1), "+7", "123456789012", "-0",
            "99999999", "100000000", "1", "2"]
    cats = ["", "0", "deadbeef", "DEADBEEF", "123456789abcdef0", "7"]
    cats += [f"{i:x}" for i in range(20)]
    parsed = parse_line(_line("1", ints, cats) + "\r\n", SIZES, line_number=4)
    assert parsed.label == 1
    expected = [0.0, 0.0, math.log1p(5), 0.0, 63 * math.log(2), 53 * math.log(2), math.log1p(7),
                math.log1p(123456789012), 0.0, math.log1p(99999999), math.log1p(1e8),
                math.log1p(1), math.log1p(2)]
    np.testing.assert_allclose(parsed.dense, np.array(expected, dtype=np.float32), rtol=1e-6)
    assert parsed.rows.tolist() == [_row(c, n) for c, n in zip(cats, SIZES)]
    assert parsed.rows[0] == MISSING_ROW and parsed.values[0] is None
    assert parsed.values[2] == parsed.values[3] == 0xDEADBEEF


@pytest.mark.parametrize(("label", "ints", "cats", "field"), [
    ("2", None, None, "label"),
    ("", None, None, "label"),
    ("1", ["x"] + [""] * 12, None, "I1"),
    ("1", [""] * 4 + ["1.5"] + [""] * 8, None, "I5"),
    ("1", [""] * 12 + ["-"], None, "I13"),
    ("1", [""] * 2 + ["1" + "0" * 39] + [""] * 10, None, "I3"),  # 40 digits
    ("1", [""] * 3 + [str(2 ** 63)] + [""] * 9, None, "I4"),
    ("1", [""] * 3 + [str(-2 ** 63 - 1)] + [""] * 9, None, "I4"),
    ("1", None, ["xyz"] + [""] * 25, "C1"),
    ("1", None, [""] * 9 + ["1" * 17] + [""] * 16, "C10"),
    ("1", None, [""] * 25 + ["0x12"], "C26"),
])
def test_parse_line_names_the_bad_field(label: str, ints: list[str] | None,
                                        cats: list[str] | None, field: str) -> None:
    with pytest.raises(CriteoFormatError) as info:
        parse_line(_line(label, ints, cats), SIZES, path="day_0", line_number=9)
    assert info.value.field == field and info.value.line == 9
    assert str(info.value).startswith(f"day_0, line 9, field {field}: ")
    assert isinstance(info.value, ValueError)


def test_table_sizes_needs_26_tables() -> None:
    with pytest.raises(ConfigError, match="26"):
        table_sizes([10] * 25)
    with pytest.raises(ConfigError, match="C3"):
        table_sizes([10, 10, 0] + [10] * 23)
    spec = parse_tables({"tables": [{"name": f"C{i}", "num_embeddings": n, "embedding_dim": 4,
                                     "pooling_factor": 1.0} for i, n in enumerate(SIZES)]})
    assert table_sizes(spec) == SIZES


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("chunk_bytes", [997, 1 << 24])
def test_reader_matches_the_reference_parser(tmp_path: Path, chunk_bytes: int) -> None:
    lines = _random_lines(400, seed=1)
    text = "".join(line + ("\r\n" if i % 7 == 0 else "\n") for i, line in enumerate(lines))
    path = tmp_path / "day.tsv"
    path.write_bytes(text.rstrip("\n").encode())  # no newline after the last line
    reader = CriteoReader(path, SIZES, chunk_bytes=chunk_bytes)
    labels, dense, rows = _read_all(reader)
    report = reader.report()
    assert (report.lines, report.samples, report.malformed) == (400, 400, 0)
    for i, line in enumerate(lines):
        ref = parse_line(line, SIZES)
        assert labels[i] == ref.label
        np.testing.assert_allclose(dense[i], ref.dense, rtol=1e-6)
        assert rows[i].tolist() == ref.rows.tolist()
    assert labels.dtype == dense.dtype == np.float32 and rows.dtype == np.int64


def test_reader_agrees_with_the_reference_on_garbage(tmp_path: Path) -> None:
    """Random lines, many malformed (stray characters, NUL, bytes over 0x7f, \\r, signs,
    long fields, wrong field counts): the reader keeps exactly the lines the reference
    parser accepts, with the same values."""
    rng = np.random.default_rng(11)
    odd = list(b"0123456789abcdefABCDEF-+\r \x00\xffx")
    lines = []
    for _ in range(400):
        fields = [bytes([rng.choice(list(b"0112"))])]
        for j in range(1, 40 + int(rng.choice([0] * 20 + [-1, 1]))):
            length = int(rng.integers(0, 11 if rng.random() < 0.97 else 20))
            digits = b"0123456789abcdef"[:10 if j < 14 else 16]
            alphabet = odd if rng.random() < 0.01 else list(digits)
            text = rng.choice(alphabet, length).astype(np.uint8).tobytes()
            fields.append(b"-" + text if j < 14 and text and rng.random() < 0.1 else text)
        lines.append(b"\t".join(fields))
    path = tmp_path / "garbage.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    accepted = []
    for number, line in enumerate(lines, 1):
        try:
            accepted.append(parse_line(line, SIZES, line_number=number))
        except CriteoFormatError:
            pass
    assert 50 < len(accepted) < 350
    reader = CriteoReader(path, SIZES, chunk_bytes=500)
    labels, dense, rows = _read_all(reader)
    assert reader.report().malformed == 400 - len(accepted)
    assert labels.tolist() == [float(a.label) for a in accepted]
    assert rows.tolist() == [a.rows.tolist() for a in accepted]
    np.testing.assert_allclose(dense, np.stack([a.dense for a in accepted]), rtol=1e-6)


def test_plain_lines_take_the_vectorised_path(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [_line("0", ["", "-3", "12345678", "0"] + ["7"] * 9,
                   ["", "ABCDEF01", "1", "00000000"] + [f"{i:x}" for i in range(22)]),
             _line("1")]
    path = _write(tmp_path / "day.tsv", lines, end="\r\n")
    expected = [parse_line(line, SIZES) for line in lines]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reference parser was called")

    monkeypatch.setattr(criteo_reader, "parse_line_bytes", refuse)
    labels, dense, rows = _read_all(CriteoReader(path, SIZES))
    assert labels.tolist() == [0.0, 1.0]
    assert rows.tolist() == [e.rows.tolist() for e in expected]
    np.testing.assert_allclose(dense, np.stack([e.dense for e in expected]), rtol=1e-6)


@pytest.mark.parametrize("workers", [1, 3])
def test_values_arrow_would_accept_are_malformed(tmp_path: Path, workers: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrow trims spaces, reads 0x hex, skips a byte-order mark inside a block and ends
    lines at a lone \r; the grammar does not. A block holding one is halved until the bad
    line is found, so only a few lines go through the reference parser. The file's own
    byte-order mark (its first bytes) is skipped."""
    rng = np.random.default_rng(13)
    good = [_line(str(rng.integers(0, 2)),
                  [str(v) if v > -5 else "" for v in rng.integers(-9, 99, 13)],
                  [f"{v:08x}" if v % 5 else "" for v in rng.integers(0, 2 ** 32, 26)])
            for _ in range(2000)]
    bad = {100: _line("1", [" 7"] + [""] * 12), 700: _line("1", ["0x1F"] + [""] * 12),
           1300: _line("1", None, ["ab\rcd"] + ["1"] * 25), 1900: _line("1", ["7 "] + [""] * 12),
           1950: _line("1") + "\r" + _line("0")}  # Arrow: two lines of 40 fields
    lines = list(good)
    for at, line in bad.items():
        lines.insert(at, line)
    path = tmp_path / "day.tsv"
    lines[1500] = "\ufeff" + lines[1500]  # a mark inside the file: malformed
    path.write_bytes(b"\xef\xbb\xbf" + "".join(line + "\n" for line in lines).encode())
    calls: list[int] = []
    slow = criteo_reader.parse_line_bytes

    def counted(line: bytes, sizes: tuple[int, ...], where: str, number: int) -> object:
        calls.append(number)
        return slow(line, sizes, where, number)

    monkeypatch.setattr(criteo_reader, "parse_line_bytes", counted)
    reader = CriteoReader(path, SIZES, chunk_bytes=1 << 20, workers=workers)
    labels, _, rows = _read_all(reader)
    assert len(calls) < 6 * 2 * criteo_reader._BISECT_LINES
    monkeypatch.undo()
    report = reader.report()
    assert report.malformed == 6 and report.samples == 1999
    assert [e.line for e in report.errors] == [101, 701, 1301, 1501, 1901, 1951]
    kept = [g for g in lines if g not in bad.values() and not g.startswith("\ufeff")]
    assert rows.tolist() == [parse_line(g, SIZES).rows.tolist() for g in kept]
    assert labels.shape == (1999,)


def test_threads_give_the_same_samples(tmp_path: Path) -> None:
    path = _write(tmp_path / "day.tsv", _random_lines(300, seed=2))
    one = _read_all(CriteoReader(path, SIZES, chunk_bytes=2000))
    two = _read_all(CriteoReader(path, SIZES, chunk_bytes=2000, workers=3))
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def _with_malformed(tmp_path: Path) -> tuple[Path, list[int]]:
    """A file whose lines 3, 5, 6, 8, 10 and 11 (1-based) are malformed."""
    good = _random_lines(6, seed=3)
    lines = [good[0], good[1],
             _line("1", ["1"] * 12),  # 39 fields
             good[2],
             _line("1", None, ["00"] * 27),  # 41 fields
             "",  # empty line
             good[3],
             _line("1", ["1", "-x"] + ["1"] * 11),
             good[4],
             _line("7"),
             _line("0", None, ["a"] * 25 + ["g"]),
             good[5]]
    return _write(tmp_path / "bad.tsv", lines), [3, 5, 6, 8, 10, 11]


def test_malformed_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    path, bad = _with_malformed(tmp_path)
    good = _random_lines(6, seed=3)
    for chunk_bytes in (100, 1 << 20):
        reader = CriteoReader(path, SIZES, chunk_bytes=chunk_bytes)
        _, _, rows = _read_all(reader)
        report = reader.report()
        assert (report.lines, report.samples, report.malformed) == (12, 6, 6)
        assert [e.line for e in report.errors] == bad
        assert [e.field for e in report.errors] == [None, None, None, "I2", "label", "C26"]
        assert "6 malformed" in report.summary() and "line 3" in report.summary()
        assert rows.tolist() == [parse_line(g, SIZES).rows.tolist() for g in good]


def test_strict_mode_raises_at_the_first_malformed_line(tmp_path: Path) -> None:
    path, _ = _with_malformed(tmp_path)
    with pytest.raises(CriteoFormatError, match=r"bad\.tsv, line 3: has 39 fields, expected 40"):
        _read_all(CriteoReader(path, SIZES, strict=True))
    with pytest.raises(CriteoFormatError, match=r"line 8, field I2: not an integer: '-x'"):
        _read_all(CriteoReader(path, SIZES, strict=True, start=6))


def test_huge_and_negative_integers(tmp_path: Path) -> None:
    ints = ["-1", "-12345678", "-123456789", str(2 ** 63 - 1), "99999999", "123456789", "0",
            "", "00000042", "-0", "1", "22", str(-2 ** 63)]
    path = _write(tmp_path / "day.tsv", [_line("0", ints), _line("1", ints[::-1])])
    _, dense, _ = _read_all(CriteoReader(path, SIZES))
    expected = [0, 0, 0, 63 * math.log(2), math.log1p(99999999), math.log1p(123456789), 0, 0,
                math.log1p(42), 0, math.log1p(1), math.log1p(22), 0]
    np.testing.assert_allclose(dense[0], expected, rtol=1e-6)
    np.testing.assert_allclose(dense[1], expected[::-1], rtol=1e-6)


def test_integers_beyond_64_bits_are_malformed(tmp_path: Path) -> None:
    """A 40-digit integer: counted and skipped, or under strict an error naming the
    line and the field."""
    good = _random_lines(200, seed=12)
    lines = [*good[:150], _line("1", ["7", "1" + "0" * 39] + ["1"] * 11), *good[150:]]
    path = _write(tmp_path / "day.tsv", lines)
    reader = CriteoReader(path, SIZES, chunk_bytes=1 << 20)
    _, _, rows = _read_all(reader)
    report = reader.report()
    assert (report.lines, report.samples, report.malformed) == (201, 200, 1)
    assert (report.errors[0].line, report.errors[0].field) == (151, "I2")
    assert rows.tolist() == [parse_line(g, SIZES).rows.tolist() for g in good]
    with pytest.raises(CriteoFormatError,
                       match=r"day\.tsv, line 151, field I2: integer outside the 64-bit range"):
        _read_all(CriteoReader(path, SIZES, strict=True))


def test_overlong_line_is_skipped_without_reading_it_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(criteo_reader, "MAX_LINE_BYTES", 500)
    good = _random_lines(3, seed=4)
    path = _write(tmp_path / "day.tsv", [good[0], "9" * 5000, good[1], good[2], "7" * 3000])
    reader = CriteoReader(path, SIZES, chunk_bytes=256)
    _, _, rows = _read_all(reader)
    report = reader.report()
    assert (report.lines, report.samples, report.malformed) == (5, 3, 2)
    assert [e.line for e in report.errors] == [2, 5]
    assert "longer than 500 bytes" in str(report.errors[0])
    assert rows.tolist() == [parse_line(g, SIZES).rows.tolist() for g in good]


def test_line_ranges_split_the_file(tmp_path: Path) -> None:
    lines = [_line("1", [str(i)] + [""] * 12) for i in range(100)]
    lines[42] = "garbage"
    path = _write(tmp_path / "day.tsv", lines)

    def first_ints(**kw: int | None) -> list[int]:
        _, dense, _ = _read_all(CriteoReader(path, SIZES, chunk_bytes=333, **kw))
        return np.rint(np.expm1(dense[:, 0].astype(np.float64))).astype(int).tolist()

    train, valid = first_ints(stop=70), first_ints(start=70)
    assert train == [i for i in range(70) if i != 42]
    assert valid == list(range(70, 100))
    assert first_ints(start=40, stop=45) == [40, 41, 43, 44]
    assert first_ints(start=100) == [] and first_ints(start=500) == []
    assert first_ints(start=10, stop=10) == []
    reader = CriteoReader(path, SIZES, start=40, stop=45)
    _read_all(reader)
    assert (reader.report().lines, reader.report().malformed) == (5, 1)
    assert reader.report().errors[0].line == 43
    with pytest.raises(ConfigError):
        CriteoReader(path, SIZES, start=5, stop=4)


def test_missing_file_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(CriteoFormatError, match="nope.tsv: cannot open"):
        _read_all(CriteoReader(tmp_path / "nope.tsv", SIZES))


# ---------------------------------------------------------------- cache


def test_cache_round_trip(tmp_path: Path) -> None:
    lines = _random_lines(300, seed=5)
    path = _write(tmp_path / "day.tsv", lines)
    labels, dense, rows = _read_all(CriteoReader(path, SIZES))
    seen: list[tuple[int, int]] = []
    cache_path = tmp_path / "caches" / "day.cache"  # the directory is created
    cache = build_cache(path, cache_path, SIZES, chunk_bytes=4096,
                        progress=lambda done, total: seen.append((done, total)))
    size = path.stat().st_size
    assert len(seen) > 1 and seen[-1] == (size, size) and seen == sorted(seen)
    assert len(cache) == 300 and cache.table_sizes == SIZES
    assert cache.records.dtype == record_dtype(SIZES) and cache.records.dtype.itemsize == 160
    np.testing.assert_array_equal(cache.records["label"], labels)
    np.testing.assert_array_equal(cache.records["dense"], dense)
    np.testing.assert_array_equal(cache.rows(0, 300), rows)
    again = CriteoCache.open(cache_path)
    assert again.header == cache.header
    assert again.header.stamp.size == path.stat().st_size
    assert (again.header.lines, again.header.malformed, again.header.start) == (300, 0, 0)
    chunks = list(again.row_chunks(limit=250, chunk=100))
    assert [c.shape for c in chunks] == [(100, 26), (100, 26), (50, 26)]
    np.testing.assert_array_equal(np.concatenate(chunks), rows[:250])
    assert [p.name for p in cache_path.parent.iterdir()] == ["day.cache"]


def test_cache_of_huge_tables_stores_int64_rows(tmp_path: Path) -> None:
    sizes = (2 ** 32 + 5,) * 26
    path = _write(tmp_path / "day.tsv", _random_lines(20, seed=6))
    cache = build_cache(path, tmp_path / "day.cache", sizes)
    assert cache.records["rows"].dtype == np.int64
    assert int(cache.rows(0, 20).max()) >= 2 ** 31
    np.testing.assert_array_equal(cache.rows(0, 20), _read_all(CriteoReader(path, sizes))[2])


def test_fresh_cache_is_reused_and_stale_one_rebuilt(tmp_path: Path) -> None:
    lines = _random_lines(50, seed=7)
    source, cache_path = _write(tmp_path / "day.tsv", lines), tmp_path / "day.cache"
    first = open_or_build_cache(source, cache_path, SIZES)
    inode = cache_path.stat().st_ino
    assert len(open_or_build_cache(source, cache_path, SIZES)) == 50
    assert cache_path.stat().st_ino == inode  # reused, not rewritten
    del first

    _write(source, lines + lines[:3])  # modified: size changes
    with pytest.raises(CriteoCacheError, match="stale: the source's size changed"):
        open_or_build_cache(source, cache_path, SIZES, rebuild=False)
    assert len(open_or_build_cache(source, cache_path, SIZES)) == 53

    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched
    with pytest.raises(CriteoCacheError, match="modified after the cache was built"):
        open_or_build_cache(source, cache_path, SIZES, rebuild=False)
    assert len(open_or_build_cache(source, cache_path, SIZES)) == 53

    other = tuple(s + 1 for s in SIZES)
    with pytest.raises(CriteoCacheError, match="table sizes differ"):
        open_or_build_cache(source, cache_path, other, rebuild=False)
    with pytest.raises(CriteoCacheError, match=r"holds lines \[0, None\), not \[0, 10\)"):
        open_or_build_cache(source, cache_path, SIZES, stop=10, rebuild=False)
    assert len(open_or_build_cache(source, cache_path, SIZES, stop=10)) == 10


def test_broken_cache_files_are_refused_or_rebuilt(tmp_path: Path) -> None:
    source, cache_path = _write(tmp_path / "day.tsv", _random_lines(30, seed=8)), tmp_path / "c"
    build_cache(source, cache_path, SIZES)
    data = cache_path.read_bytes()
    cache_path.write_bytes(data[:-10])  # truncated
    with pytest.raises(CriteoCacheError, match="truncated"):
        CriteoCache.open(cache_path)
    assert len(open_or_build_cache(source, cache_path, SIZES)) == 30
    cache_path.write_bytes(b"not a cache at all, just some bytes" * 4)
    with pytest.raises(CriteoCacheError, match="not a Criteo cache"):
        CriteoCache.open(cache_path)
    cache_path.write_bytes(data.replace(b'"version": 1', b'"version": 9'))
    with pytest.raises(CriteoCacheError, match="version 9"):
        CriteoCache.open(cache_path)
    with pytest.raises(CriteoCacheError, match="no such cache file"):
        CriteoCache.open(tmp_path / "missing")


def test_failed_build_keeps_the_old_cache_and_leaves_no_temporary(tmp_path: Path) -> None:
    path, _ = _with_malformed(tmp_path)
    cache_path = tmp_path / "bad.cache"
    old = build_cache(path, cache_path, SIZES)
    assert (len(old), old.header.malformed) == (6, 6)
    assert old.header.errors[0] == {"line": 3, "field": None,
                                    "reason": "has 39 fields, expected 40"}
    before = cache_path.read_bytes()
    with pytest.raises(CriteoFormatError, match="line 3"):
        build_cache(path, cache_path, SIZES, strict=True)
    assert cache_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.cache", "bad.tsv"]
    with pytest.raises(CriteoFormatError, match="line 3"):  # a fresh cache that skipped lines
        open_or_build_cache(path, cache_path, SIZES, strict=True)


# ---------------------------------------------------------------- batches


def test_batches_have_the_trainer_layout(tmp_path: Path) -> None:
    lines = _random_lines(10, seed=9)
    source = _write(tmp_path / "day.tsv", lines)
    train = build_cache(source, tmp_path / "train.cache", SIZES, stop=7)
    valid = build_cache(source, tmp_path / "valid.cache", SIZES, start=7)
    data = CriteoClicks(train, valid)
    batch = data.batch(0, 4)
    assert batch.dense.shape == (4, 13) and batch.dense.dtype == torch.float32
    assert batch.labels.shape == (4,) and batch.labels.dtype == torch.float32
    assert torch.isnan(batch.teacher_prob).all() and batch.teacher_prob.shape == (4,)
    assert len(batch.sparse.ids) == 26 and batch.sparse.batch_size == 4
    for ids, offsets in zip(batch.sparse.ids, batch.sparse.offsets):
        assert ids.dtype == torch.int64 and ids.shape == (4,)
        assert offsets.tolist() == [0, 1, 2, 3, 4]
    refs = [parse_line(line, SIZES) for line in lines]
    assert [batch.sparse.ids[t][1].item() for t in range(26)] == refs[1].rows.tolist()
    np.testing.assert_allclose(batch.dense[2].numpy(), refs[2].dense, rtol=1e-6)
    assert batch.labels.tolist() == [float(r.label) for r in refs[:4]]

    wrapped = data.batch(1, 4)  # samples 4, 5, 6, then 0: wraps around the epoch
    assert wrapped.labels.tolist() == [float(refs[i].label) for i in (4, 5, 6, 0)]
    assert data.batch(7, 1).labels.item() == refs[0].label
    assert data.num_batches(3) == 2 and data.num_batches(3, validation=True) == 1
    v = data.batch(VALIDATION_OFFSET + 1, 2)  # validation samples 2, 0
    assert [v.sparse.ids[0][i].item() for i in range(2)] == [refs[9].rows[0], refs[7].rows[0]]
    batch.dense.add_(1.0)  # the tensors own their memory: the read-only map is untouched
    with pytest.raises(ConfigError, match="no validation data"):
        CriteoClicks(train).batch(VALIDATION_OFFSET, 2)
    with pytest.raises(ConfigError):
        data.batch(0, 0)
    assert CriteoClicks(train, tables=SIZES).table_sizes == SIZES
    with pytest.raises(ConfigError, match="other table sizes"):
        CriteoClicks(train, tables=(7,) * 26)


# ---------------------------------------------------------------- damaged caches, empty ranges


def _corrupt_rows(cache_path: Path, sample: int, table: int, value: int) -> None:
    """Overwrite one row id of a cache file in place (int32 rows)."""
    dtype = record_dtype(SIZES)
    at = criteo.CACHE_DATA_OFFSET + sample * dtype.itemsize + dtype.fields["rows"][1] + 4 * table
    with open(cache_path, "r+b") as f:
        f.seek(at)
        f.write(int(value).to_bytes(4, "little", signed=True))


def test_damaged_records_are_reported_with_the_file_and_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _write(tmp_path / "day.tsv", _random_lines(60, seed=14))
    cache_path = tmp_path / "day.cache"
    build_cache(source, cache_path, SIZES)
    _corrupt_rows(cache_path, 2, 4, -1804901973)  # among the records checked on opening
    with pytest.raises(CriteoCacheError) as info:
        CriteoCache.open(cache_path)
    message = str(info.value)
    assert message.startswith(f"{cache_path}: corrupted cache: sample 2: row -1804901973 of "
                              f"table C5 is outside 0..{SIZES[4] - 1}")
    assert "delete the file and run again" in message
    assert len(open_or_build_cache(source, cache_path, SIZES)) == 60  # rebuilt
    CriteoCache.open(cache_path)

    monkeypatch.setattr(criteo_cache, "CHECKED_RECORDS", 2)  # damage beyond the opening check
    _corrupt_rows(cache_path, 30, 0, SIZES[0])
    data = CriteoClicks(open_or_build_cache(source, cache_path, SIZES, rebuild=False))
    data.batch(0, 16)  # samples 0..15 are fine
    with pytest.raises(CriteoCacheError, match=rf"{cache_path.name}: corrupted cache: sample 30: "
                                               rf"row {SIZES[0]} of table C1"):
        data.batch(1, 16)
    with pytest.raises(CriteoCacheError, match="sample 30"):
        data.batch(1, 50)  # wraps around: samples 50..59, then 0..39
    with pytest.raises(CriteoCacheError, match="sample 30"):
        list(data.train.row_chunks(chunk=8))


def test_damaged_header_is_refused(tmp_path: Path) -> None:
    source = _write(tmp_path / "day.tsv", _random_lines(20, seed=15))
    cache_path = tmp_path / "day.cache"
    build_cache(source, cache_path, SIZES)
    data = cache_path.read_bytes()
    cache_path.write_bytes(data.replace(b'"malformed": 0', b'"malformed": 7'))
    with pytest.raises(CriteoCacheError, match="corrupted cache header: 20 samples and 7 "
                                               "malformed lines do not make 20 lines"):
        CriteoCache.open(cache_path)
    sizes = json.dumps(list(SIZES)).encode()  # same length: the header's length is stored
    cache_path.write_bytes(data.replace(sizes, sizes.replace(b"[50,", b"[ 0,")))
    with pytest.raises(CriteoCacheError, match="not 26 positive sizes"):
        CriteoCache.open(cache_path)


def test_ranges_without_samples_are_errors_and_leave_no_file(tmp_path: Path) -> None:
    source = _write(tmp_path / "day.tsv", _random_lines(100, seed=16))
    cache_path = tmp_path / "day.cache"
    for start, stop, shown in ((100, None, "lines 100:"), (4_000_000, 4_000_010,
                                                           "lines 4000000:4000010")):
        with pytest.raises(CriteoFormatError) as info:
            build_cache(source, cache_path, SIZES, start=start, stop=stop)
        assert str(info.value) == (f"{source}: {shown} are beyond the end of the file, "
                                   f"which has 100 lines")
    bad = _write(tmp_path / "bad.tsv", ["x"] * 5 + _random_lines(3, seed=17))
    with pytest.raises(CriteoFormatError, match=r"lines 0:5 hold no valid sample: all 5 are "
                                                r"malformed \(first: .*line 1: has 1 fields"):
        build_cache(bad, cache_path, SIZES, stop=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "day.tsv"]
    assert len(build_cache(bad, cache_path, SIZES, start=5)) == 3
    assert CriteoReader(source, SIZES, start=100).report().file_lines is None
    reader = CriteoReader(source, SIZES, start=10, stop=20)
    _read_all(reader)
    assert reader.report().file_lines is None  # stopped before the end
    reader = CriteoReader(source, SIZES, start=90)
    _read_all(reader)
    assert reader.report().file_lines == 100
