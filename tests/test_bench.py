"""The benchmark's measuring code sees what it claims to: wall time, anonymous memory."""

from __future__ import annotations

import sys

import bench_convert as bench  # bench/ is on sys.path (conftest.py)
import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the benchmark reads /proc", allow_module_level=True)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_sampler_sees_a_known_allocation():
    # 200 MiB written byte by byte: every page is resident anonymous memory.
    result = bench.measure(_python("import time; b = b'x' * (200 << 20); time.sleep(0.3)"))
    assert result.returncode == 0
    assert 190 <= result.rss_anon_mib < 260
    assert result.vm_hwm_mib >= result.rss_anon_mib
    assert result.samples >= 10
    assert 0.3 <= result.wall_s < 3


def test_file_backed_pages_are_not_counted(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"\1" * (64 << 20))
    code = (
        "import mmap, sys, time\n"
        "with open(sys.argv[1], 'rb') as f:\n"
        "    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
        "    assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096\n"
        "    time.sleep(0.2)\n"
    )
    result = bench.measure([*_python(code), str(data)])
    assert result.returncode == 0
    assert result.rss_anon_mib < 40  # the interpreter alone, not the 64 MiB map
    assert result.vm_hwm_mib >= 64


def test_sequence_adds_walls_and_keeps_the_largest_memory_and_first_failure():
    result = bench.measure_sequence(
        [
            _python("import time; b = b'x' * (100 << 20); time.sleep(0.2)"),
            _python("import sys, time; time.sleep(0.2); sys.exit(3)"),
        ]
    )
    assert result.wall_s >= 0.4
    assert result.rss_anon_mib >= 95
    assert result.returncode == 3


def test_targets_and_table_from_known_medians():
    def case(key, wall, anon):
        c = bench.Case(key, key, [["true"]])
        c.runs.append(bench.Measurement(wall, anon, anon, 0, 1))
        return c

    cases = [case("naive_check", 4.0, 1500.0), case("fc_st", 1.0, 100.0), case("help", 0.5, 10)]
    by_key = {c.key: c for c in cases}
    wall, memory = (t for t in bench.TARGETS if t.case == "fc_st" and t.base != "cp_sync")
    row = bench.evaluate(wall, by_key)
    assert row["limit"] == pytest.approx(1.4) and row["ratio"] == pytest.approx(0.25)
    assert row["met"] is True
    assert bench.evaluate(memory, by_key)["met"] is True
    help_row = bench.evaluate(next(t for t in bench.TARGETS if t.case == "help"), by_key)
    assert help_row["met"] is False
    missing = bench.evaluate(next(t for t in bench.TARGETS if t.case == "fc_pth"), by_key)
    assert missing["met"] is None
    table = bench.render(cases, ["header"])
    assert table.splitlines()[0] == "header"
    assert "| fc_st | wall <= 0.35 x naive --check | 1.40 s | 1.00 s | 0.25 x | yes |" in table
    assert "| help | wall <= 0.3 s | 0.30 s | 0.50 s | - | **no** |" in table


def test_wide_fixture_is_about_four_times_vgg16():
    from zoo import state_dict_shapes

    def count(shapes):
        total = 0
        for shape in shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    wide = bench.wide_vgg16_shapes()
    assert 3.8 < count(wide) / count(state_dict_shapes("vgg16")) < 4.2
    assert wide["classifier.0.weight"][1] == 512 * 7 * 7
    assert wide["classifier.3.weight"][1] == wide["classifier.0.weight"][0]


def test_cpu_time_counts_work_not_waiting():
    busy = bench.measure(
        _python("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass")
    )
    idle = bench.measure(_python("import time; time.sleep(0.4)"))
    assert busy.returncode == idle.returncode == 0
    assert 0.4 <= busy.cpu_s < busy.wall_s + 0.05
    assert idle.cpu_s < 0.3 <= idle.wall_s
