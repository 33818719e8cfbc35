"""Data errors through dlrm-run: exit 2, one line on stderr naming the file, and no cache
file left behind (a damaged cache, line ranges beyond the file, 64-bit overflow). A cache
damaged where opening does not look is found by the batch that reads it, after the
run's info lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import run as run_cli
from cli.errors import ExitCode
from dlrm_runtime.data.criteo import cache as criteo_module
from dlrm_runtime.data.criteo import CACHE_DATA_OFFSET, build_cache, record_dtype, table_sizes
from planner import read_plan
from tests.cli.test_truth import criteo  # noqa: F401 - the fixture

BASE = ["--steps", "1", "--batch-size", "32", "--bottom-mlp", "16,16", "--no-progress"]


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Error:" not in lines[0].split("error:", 1)[0]
    return lines[0]


def _damage(cache: Path, sizes: tuple[int, ...], sample: int) -> None:
    """Overwrite the row id of table C3 in ``sample`` of a cache file."""
    dtype = record_dtype(sizes)
    with open(cache, "r+b") as f:
        f.seek(CACHE_DATA_OFFSET + sample * dtype.itemsize + dtype.fields["rows"][1] + 4 * 2)
        f.write((-1804901973).to_bytes(4, "little", signed=True))


def test_damaged_cache_names_the_file_and_what_to_do(tmp_path: Path, criteo, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data, _, plan = criteo
    cache = Path(f"{data}.cache")  # the cache of the whole file, which dlrm-run reuses
    sizes = table_sizes(read_plan(plan).tables_spec)
    monkeypatch.setattr(criteo_module, "CHECKED_RECORDS", 2)  # opening checks samples 0, 1
    build_cache(data, cache, sizes)
    _damage(cache, sizes, 5)
    before = _files(tmp_path)
    code = run_cli.main(["--plan", str(plan), "--data", str(data), *BASE])
    assert code == ExitCode.BAD_INPUT
    err = capsys.readouterr().err  # found by the first batch, after the run's info lines
    assert "Traceback" not in err and err.count("error") == 1
    line = err.strip().splitlines()[-1]
    assert line == (f"dlrm-run: error: {cache}: corrupted cache: sample 5: row -1804901973 of "
                    f"table C3 is outside 0..{sizes[2] - 1}; delete the file and run again to "
                    f"rebuild it from the source")
    assert _files(tmp_path) == before
    _damage(cache, sizes, 1)  # found on opening: the cache is rebuilt
    assert run_cli.main(["--plan", str(plan), "--data", str(data), *BASE]) == ExitCode.OK
    assert criteo_module.CriteoCache.open(cache).header.samples == 600


def test_line_ranges_beyond_the_file(tmp_path: Path, criteo, capsys) -> None:
    data, _, plan = criteo
    before = _files(tmp_path)
    code = run_cli.main(["--plan", str(plan), "--data", str(data), *BASE,
                         "--train-lines", "40000000:"])
    assert code == ExitCode.BAD_INPUT
    line = _one_line(capsys.readouterr().err)
    assert line == (f"dlrm-run: error: {data}: lines 40000000: are beyond the end of the "
                    f"file, which has 601 lines")
    assert _files(tmp_path) == before
    # the train range is fine and parsed first; its new cache goes when validation fails
    code = run_cli.main(["--plan", str(plan), "--data", str(data), *BASE,
                         "--train-lines", "0:500", "--validation-lines", "700:800"])
    assert code == ExitCode.BAD_INPUT
    assert "lines 700:800 are beyond the end" in _one_line(capsys.readouterr().err)
    assert _files(tmp_path) == before


def test_integers_beyond_64_bits(tmp_path: Path, criteo, capsys) -> None:
    data, _, plan = criteo
    lines = data.read_text().splitlines()
    fields = lines[10].split("\t")
    fields[3] = "1" + "0" * 39  # I3: 40 digits
    lines[10] = "\t".join(fields)
    data.write_text("\n".join(lines) + "\n")
    before = _files(tmp_path)
    code = run_cli.main(["--plan", str(plan), "--data", str(data), *BASE, "--strict"])
    assert code == ExitCode.BAD_INPUT
    line = _one_line(capsys.readouterr().err)
    assert line == f"dlrm-run: error: {data}, line 6: has 4 fields, expected 40"  # the first
    assert _files(tmp_path) == before
    code = run_cli.main(["--plan", str(plan), "--data", str(data), *BASE, "--strict",
                         "--train-lines", "6:"])
    assert code == ExitCode.BAD_INPUT
    line = _one_line(capsys.readouterr().err)
    assert line == (f"dlrm-run: error: {data}, line 11, field I3: integer outside the 64-bit "
                    f"range: '1{'0' * 39}'")
    assert _files(tmp_path) == before
    assert run_cli.main(["--plan", str(plan), "--data", str(data), *BASE]) == ExitCode.OK
    assert "2 malformed lines skipped" in capsys.readouterr().err


def test_failed_profile_leaves_no_cache(tmp_path: Path, criteo, capsys,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from cli import plan as plan_cli
    import dlrm_runtime as profile  # the door the CLI imports profile_tables from
    from dlrm_runtime.data import ProfileError

    def fail(*args: object, **kwargs: object) -> None:
        raise ProfileError("profiling failed")

    data, tables, _ = criteo
    out = tmp_path / "profiled.json"
    argv = ["profile", str(data), "--tables", str(tables), "-o", str(out),
            "--cache", str(tmp_path / "c.cache")]
    before = _files(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(profile, "profile_tables", fail)
        assert plan_cli.main(argv) == ExitCode.BAD_INPUT  # fails after building the cache
    assert "profiling failed" in capsys.readouterr().err
    assert _files(tmp_path) == before
    assert plan_cli.main(argv) == ExitCode.OK and (tmp_path / "c.cache").exists()
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(profile, "profile_tables", fail)
        assert plan_cli.main(argv) == ExitCode.BAD_INPUT
    assert (tmp_path / "c.cache").exists()  # reused, not built by the failed run: kept
