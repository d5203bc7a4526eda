"""The input's SHA-256: from one open file, of the bytes converted, stopped after a failure."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from fc2conv_cli import digest, pipeline, write
from fc2conv_cli.digest import sha256_in_background
from fc2conv_cli.errors import CheckpointError

MAP = "version: 1\nlayout: chw\nlayers:\n  - {name: head.0, kernel: [2, 3]}\n"


def hashing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fc2conv-sha256"]


def slow_reads(monkeypatch, delay: float = 0.002) -> list[int]:
    """Make every block read take ``delay`` seconds; returns the offsets read, as read."""
    offsets: list[int] = []
    real = digest._pread_into

    def slow(fd, buffer, offset):
        offsets.append(offset)
        threading.Event().wait(delay)
        return real(fd, buffer, offset)

    monkeypatch.setattr(digest, "_pread_into", slow)
    monkeypatch.setattr(digest, "_BLOCK", 64 << 10)
    return offsets


def case(folder, rows: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    source = folder / f"model{seed}.safetensors"
    save_file(
        {
            "backbone.weight": rng.standard_normal((rows, 3, 3, 3)).astype(np.float32),
            "head.0.weight": rng.standard_normal((5, 24)).astype(np.float32),
        },
        str(source),
    )
    (folder / "map.yaml").write_text(MAP)
    return source, folder / "map.yaml"


def recorded_sha256(path) -> str:
    with safe_open(str(path), "numpy") as file:
        return file.metadata()["source_sha256"]


def test_the_digest_is_the_files_sha256(tmp_path):
    data = os.urandom(3 * digest._BLOCK + 17)
    (tmp_path / "f").write_bytes(data)
    assert sha256_in_background(tmp_path / "f").result() == hashlib.sha256(data).hexdigest()
    with open(tmp_path / "f", "rb") as file:  # a caller's open file, hashed through a dup
        file.read(5)
        job = sha256_in_background(tmp_path / "f", file.fileno())
        assert job.result() == hashlib.sha256(data).hexdigest()
        assert file.tell() == 5  # pread: the caller's offset did not move


def test_a_missing_file_fails_on_result(tmp_path):
    job = sha256_in_background(tmp_path / "nope")
    assert not job.started and not job.same_file(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="nope: cannot read: No such file"):
        job.result()


def test_cancel_stops_the_thread_before_the_end(tmp_path, monkeypatch):
    offsets = slow_reads(monkeypatch)
    (tmp_path / "f").write_bytes(bytes(8 << 20))  # 128 blocks: 0.25 s at the slowed pace
    job = sha256_in_background(tmp_path / "f")
    threading.Event().wait(0.02)
    job.cancel()
    assert hashing_threads() == []
    assert 0 < len(offsets) < 128
    with pytest.raises(CancelledError):
        job.result()


def test_a_file_that_grows_while_hashed_is_refused(tmp_path, monkeypatch):
    real = digest._pread_into
    path = tmp_path / "f"
    path.write_bytes(bytes(1 << 20))

    def growing(fd, buffer, offset):
        if offset == 0:
            with open(path, "ab") as file:
                file.write(b"more")
        return real(fd, buffer, offset)

    monkeypatch.setattr(digest, "_pread_into", growing)
    with pytest.raises(CheckpointError, match="changed while it was being read"):
        sha256_in_background(path).result()


def test_same_file_tells_a_replaced_path(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    job = sha256_in_background(tmp_path / "a")
    assert job.same_file(tmp_path / "a")
    os.replace(tmp_path / "b", tmp_path / "a")
    assert not job.same_file(tmp_path / "a")
    assert job.result() == hashlib.sha256(b"a").hexdigest()  # what it opened


def test_after_a_failed_conversion_the_hash_stops(tmp_path, run_cli, monkeypatch):
    source, map_path = case(tmp_path, rows=20_000)  # 2 MiB: 32 blocks, 1.6 s slowed
    offsets = slow_reads(monkeypatch, delay=0.05)

    def corrupt(file, planned, checkpoint):
        file.write(b"\xff" * planned.nbytes)

    monkeypatch.setattr(write, "_write_tensor", corrupt)
    outcome = run_cli("convert", source, "--map", map_path, "-o", tmp_path / "out.safetensors")
    assert outcome.code == 1, outcome.stderr
    assert hashing_threads() == []
    assert max(offsets) < source.stat().st_size - digest._BLOCK  # it never reached the end


def test_after_a_refused_map_the_hash_stops(tmp_path, run_cli, monkeypatch):
    source, map_path = case(tmp_path, rows=20_000)
    slow_reads(monkeypatch, delay=0.01)
    map_path.write_text(MAP.replace("head.0", "head.9"))
    outcome = run_cli("convert", source, "--map", map_path, "-o", tmp_path / "out.safetensors")
    assert outcome.code == 2 and "head.9.weight" in outcome.stderr
    assert hashing_threads() == []


def test_the_recorded_digest_is_of_the_bytes_converted(tmp_path, run_cli, monkeypatch):
    # The input is replaced by another file while it is being converted: the output
    # records the digest of the file that was read, not of what the path names now.
    source, map_path = case(tmp_path)
    converted_bytes = source.read_bytes()
    replacement, _ = case(tmp_path, seed=1)
    real = pipeline.write_safetensors

    def replace_then_write(*args, **kwargs):
        os.replace(replacement, source)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "write_safetensors", replace_then_write)
    output = tmp_path / "out.safetensors"
    assert run_cli("convert", source, "--map", map_path, "-o", output).code == 0
    assert recorded_sha256(output) == hashlib.sha256(converted_bytes).hexdigest()
    assert recorded_sha256(output) != hashlib.sha256(source.read_bytes()).hexdigest()


def test_an_input_replaced_before_the_reader_opens_it_is_refused(tmp_path, run_cli, monkeypatch):
    # The hash has opened the old file, the reader would read the new one: refused.
    source, map_path = case(tmp_path)
    replacement, _ = case(tmp_path, seed=1)
    real = pipeline.open_checkpoint

    def replace_then_open(*args, **kwargs):
        os.replace(replacement, source)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "open_checkpoint", replace_then_open)
    output = tmp_path / "out.safetensors"
    outcome = run_cli("convert", source, "--map", map_path, "-o", output)
    assert outcome.code == 2
    assert outcome.stderr.strip() == (
        f"error: {source}: was replaced by another file while it was being opened; nothing "
        "written, run again"
    )
    assert not output.exists() and hashing_threads() == []


def test_a_file_changed_after_hashing_but_before_use_is_refused(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"weights")
    job = sha256_in_background(path)
    job._done.wait()  # hashed; the conversion is still reading the file
    with open(path, "r+b") as file:
        file.write(b"W")
    os.utime(path, ns=(0, 0))
    with pytest.raises(CheckpointError, match="changed while it was being read"):
        job.result()
