"""The batch manifest (issue 4): globs, mirrored outputs, every problem at once, shards."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fc2conv_cli.errors import ManifestError
from fc2conv_cli.manifest import BatchItem, items_from_inputs, read_manifest, select_shard

MAP = "version: 1\nlayout: chw\nlayers:\n  - name: head.0\n    kernel: [2, 3]\n"


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not read by the manifest")


def manifest(folder: Path, text: str) -> Path:
    path = folder / "manifest.yaml"
    path.write_text(text)
    return path


def problems_of(path: Path, output_dir: Path | None = None) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        read_manifest(path, output_dir)
    assert caught.value.problems, "a ManifestError must name its problems"
    assert caught.value.message == "\n".join(caught.value.problems)
    return caught.value.problems


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """zoo/ with a map, nested .pth files, .safetensors files and files to ignore."""
    root = tmp_path / "zoo"
    touch(
        root,
        "vgg/a.pth",
        "vgg/deep/er/b.pth",
        "vgg/deep/c.pth",
        "vgg/notes.txt",
        "alex/x.safetensors",
        "alex/sub/y.safetensors",
    )
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "vgg.yaml").write_text(MAP)
    (tmp_path / "maps" / "alex.yaml").write_text(MAP)
    return root


# ------------------------------------------------------------------------- good manifests


def test_globs_are_relative_to_the_manifest_folder_and_outputs_mirror_them(zoo, monkeypatch):
    monkeypatch.chdir(zoo.parent / "maps")  # the working folder plays no part
    path = manifest(
        zoo,
        "version: 1\n"
        "output_dir: converted/\n"
        "jobs:\n"
        "  - inputs: 'vgg/**/*.pth'\n"
        "    map: ../maps/vgg.yaml\n"
        "  - inputs: 'alex/*.safetensors'\n"
        "    map: ../maps/alex.yaml\n",
    )
    items = read_manifest(path)
    assert all(isinstance(item, BatchItem) for item in items)
    assert [item.relative for item in items] == [
        "alex/x.safetensors",
        "vgg/a.safetensors",
        "vgg/deep/c.safetensors",
        "vgg/deep/er/b.safetensors",
    ]
    by_relative = {item.relative: item for item in items}
    # `**` matches no folder as well as several; `*` does not descend (alex/sub/y).
    assert by_relative["vgg/a.safetensors"].input == zoo / "vgg/a.pth"
    assert by_relative["vgg/deep/er/b.safetensors"].input == zoo / "vgg/deep/er/b.pth"
    assert "alex/sub/y.safetensors" not in by_relative
    for item in items:
        assert item.input.is_file()
        assert item.output == zoo / "converted" / item.relative
        assert item.output.suffix == ".safetensors"
        expected_map = "alex.yaml" if item.relative.startswith("alex/") else "vgg.yaml"
        assert item.map_path.resolve() == (zoo.parent / "maps" / expected_map).resolve()
    assert list(items) == sorted(items)


def test_double_star_reaches_every_depth_and_ignores_non_checkpoints(zoo):
    path = manifest(
        zoo, "version: 1\noutput_dir: out\njobs:\n  - {inputs: '**/*', map: ../maps/vgg.yaml}\n"
    )
    relatives = [item.relative for item in read_manifest(path)]
    assert relatives == [
        "alex/sub/y.safetensors",
        "alex/x.safetensors",
        "vgg/a.safetensors",
        "vgg/deep/c.safetensors",
        "vgg/deep/er/b.safetensors",
    ]  # notes.txt and manifest.yaml are not checkpoints


def test_output_option_overrides_the_manifests_output_dir(zoo, tmp_path):
    path = manifest(
        zoo,
        "version: 1\noutput_dir: converted\n"
        "jobs:\n  - {inputs: 'vgg/*.pth', map: ../maps/vgg.yaml}\n",
    )
    elsewhere = tmp_path / "elsewhere"
    (item,) = read_manifest(path, elsewhere)
    assert item.output == elsewhere / "vgg" / "a.safetensors"


def test_output_option_stands_in_for_a_missing_output_dir(zoo, tmp_path):
    path = manifest(zoo, "version: 1\njobs:\n  - {inputs: 'vgg/*.pth', map: ../maps/vgg.yaml}\n")
    assert any("output_dir" in p for p in problems_of(path))
    (item,) = read_manifest(path, tmp_path / "out")
    assert item.output == tmp_path / "out" / "vgg" / "a.safetensors"


@pytest.mark.parametrize("override", [False, True], ids=["output_dir", "-o"])
def test_a_glob_never_matches_the_output_folder_nor_temp_files(zoo, override):
    # A previous run's outputs (and a killed writer's temp file) inside the input tree.
    touch(
        zoo,
        "converted/alex/x.safetensors",
        "converted/vgg/deep/c.safetensors",
        "converted/vgg/.a.safetensors.0123abcd.tmp",
        "alex/.x.safetensors.89abcdef.tmp",
    )
    text = "version: 1\noutput_dir: converted\njobs:\n  - {inputs: '**/*', map: ../maps/vgg.yaml}\n"
    path = manifest(zoo, text)
    items = read_manifest(path, zoo / "converted" if override else None)
    assert [item.relative for item in items] == [
        "alex/sub/y.safetensors",
        "alex/x.safetensors",
        "vgg/a.safetensors",
        "vgg/deep/c.safetensors",
        "vgg/deep/er/b.safetensors",
    ]
    assert all("converted" not in item.input.parts for item in items)


def test_the_manifest_knows_the_writers_temp_names(tmp_path):
    from fc2conv_cli.manifest import TEMP_NAME
    from fc2conv_cli.write import _temp_path, is_temp_file

    for name in ("model.safetensors", "a.b.pth", ".hidden.safetensors", "x"):
        temp = _temp_path(tmp_path / name)
        assert TEMP_NAME.fullmatch(temp.name) and is_temp_file(temp)
    for name in ("model.safetensors", ".model.safetensors", "model.0123abcd.tmp"):
        assert not TEMP_NAME.fullmatch(name) and not is_temp_file(tmp_path / name)


def test_the_output_folder_is_skipped_by_any_spelling(zoo, monkeypatch):
    touch(zoo, "out/vgg/a.safetensors")
    monkeypatch.chdir(zoo / "vgg")
    text = (
        "version: 1\noutput_dir: ./vgg/../out/\n"
        "jobs:\n  - {inputs: '**/*.safetensors', map: ../maps/vgg.yaml}\n"
    )
    items = read_manifest(manifest(zoo, text))
    assert [item.relative for item in items] == ["alex/sub/y.safetensors", "alex/x.safetensors"]
    # -o relative to the working folder, the same folder.
    items = read_manifest(manifest(zoo, text), Path("../out"))
    assert [item.relative for item in items] == ["alex/sub/y.safetensors", "alex/x.safetensors"]


def test_an_output_folder_that_holds_the_inputs_skips_nothing(zoo):
    # output_dir "." writes each .safetensors beside its .pth: the inputs are not skipped.
    text = "version: 1\noutput_dir: .\njobs:\n  - {inputs: 'vgg/**/*.pth', map: ../maps/vgg.yaml}\n"
    items = read_manifest(manifest(zoo, text))
    assert [item.output for item in items] == [
        zoo / "vgg/a.safetensors",
        zoo / "vgg/deep/c.safetensors",
        zoo / "vgg/deep/er/b.safetensors",
    ]


# --------------------------------------------------------------------------- bad manifests


def test_every_problem_is_reported_at_once(zoo):
    path = manifest(
        zoo,
        "version: 2\n"
        "output_dir: out\n"
        "colour: blue\n"
        "jobs:\n"
        "  - inputs: 'vgg/*.pth'\n"
        "    map: ../maps/missing.yaml\n"
        "    speed: fast\n"
        "  - inputs: 'resnet/*.pth'\n"
        "    map: ../maps/vgg.yaml\n"
        "  - inputs: '../zoo/vgg/*.pth'\n"
        "    map: ../maps/vgg.yaml\n",
    )
    problems = problems_of(path)
    assert len(problems) == 6, problems
    joined = "\n".join(problems)
    for needle in (
        "unknown key 'colour'",
        "version: expected 1, got 2",
        "jobs[0]: unknown key 'speed'",
        "jobs[0]: map:",
        "missing.yaml does not exist",
        "jobs[1]: inputs: 'resnet/*.pth' matches no checkpoint",
        "jobs[2]: inputs: '../zoo/vgg/*.pth' must stay inside the manifest's folder",
    ):
        assert needle in joined, (needle, problems)
    assert all(p.startswith(str(path)) for p in problems)
    assert all("\n" not in p for p in problems)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("version: 2\noutput_dir: o\njobs: [{inputs: 'vgg/*.pth', map: ../maps/vgg.yaml}]\n",
         "version: expected 1, got 2"),
        ("output_dir: o\njobs: [{inputs: 'vgg/*.pth', map: ../maps/vgg.yaml}]\n",
         "version: expected 1, got None"),
        ("version: 1\noutput_dir: o\njobs: []\n", "jobs: expected a non-empty list"),
        ("version: 1\noutput_dir: o\n", "jobs: expected a non-empty list"),
        ("version: 1\noutput_dir: o\njobs: {inputs: 'vgg/*.pth'}\n",
         "jobs: expected a non-empty list"),
        ("version: 1\noutput_dir: o\njobs: [{inputs: 'nothing/*.pth', map: ../maps/vgg.yaml}]\n",
         "'nothing/*.pth' matches no checkpoint"),
        ("version: 1\noutput_dir: o\njobs: [{inputs: 'vgg/*.txt', map: ../maps/vgg.yaml}]\n",
         "'vgg/*.txt' matches no checkpoint"),
        ("version: 1\noutput_dir: o\njobs: [{inputs: 'vgg/*.pth', map: nope.yaml}]\n",
         "nope.yaml does not exist"),
        ("version: 1\noutput_dir: o\njobs: [{inputs: 'vgg/*.pth'}]\n", "map: expected the path"),
        ("version: 1\noutput_dir: o\njobs: [{map: ../maps/vgg.yaml}]\n", "inputs: expected a glob"),
        ("version: 1\noutput_dir: o\njobs: [{inputs: '../zoo/**/*.pth', map: ../maps/vgg.yaml}]\n",
         "must stay inside the manifest's folder"),
        ("version: 1\noutput_dir: o\njobs: [{inputs: 'vgg/../../zoo/vgg/*.pth', "
         "map: ../maps/vgg.yaml}]\n", "must stay inside the manifest's folder"),
        ("version: 1\noutput_dir: o\njobs: [{inputs: '/etc/*.pth', map: ../maps/vgg.yaml}]\n",
         "must stay inside the manifest's folder"),
        ("version: 1\noutput_dir: o\nextra: 1\njobs: [{inputs: 'vgg/*.pth', "
         "map: ../maps/vgg.yaml}]\n", "unknown key 'extra'"),
        ("version: 1\noutput_dir: o\njobs: ['vgg/*.pth']\n", "jobs[0]: expected a mapping"),
        ("- just a list\n", "expected a mapping"),
        ("version: 1\noutput_dir: [o\n", "YAML syntax error"),
    ],
)  # fmt: skip
def test_each_problem_is_named(zoo, text, needle):
    problems = problems_of(manifest(zoo, text))
    assert len(problems) == 1, problems
    assert needle in problems[0], problems


def test_a_missing_manifest_is_named(tmp_path):
    problems = problems_of(tmp_path / "absent.yaml")
    assert problems == [f"{tmp_path / 'absent.yaml'}: manifest not found"]


def test_one_file_matched_by_two_jobs_is_refused(zoo):
    path = manifest(
        zoo,
        "version: 1\noutput_dir: out\njobs:\n"
        "  - {inputs: 'vgg/*.pth', map: ../maps/vgg.yaml}\n"
        "  - {inputs: 'vgg/**/*.pth', map: ../maps/alex.yaml}\n",
    )
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert "a.pth is matched twice" in problems[0]


def test_two_inputs_with_one_output_are_refused(zoo):
    touch(zoo, "vgg/x.pth", "vgg/x.safetensors")
    path = manifest(
        zoo, "version: 1\noutput_dir: out\njobs:\n  - {inputs: 'vgg/x.*', map: ../maps/vgg.yaml}\n"
    )
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert "x.pth" in problems[0] and "x.safetensors" in problems[0]
    assert f"would both be written to {zoo / 'out' / 'vgg' / 'x.safetensors'}" in problems[0]


# ------------------------------------------------------------------------ inputs and --map


def test_inputs_mirror_their_common_folder(tmp_path):
    touch(tmp_path, "ckpts/a/one.pth", "ckpts/b/deep/two.safetensors", "ckpts/three.bin")
    inputs = [
        tmp_path / "ckpts/b/deep/two.safetensors",
        tmp_path / "ckpts/three.bin",
        tmp_path / "ckpts/a/one.pth",
    ]
    out = tmp_path / "out"
    items = items_from_inputs(inputs, tmp_path / "map.yaml", out)
    assert [(i.relative, i.input, i.output) for i in items] == [
        ("a/one.safetensors", inputs[2], out / "a/one.safetensors"),
        ("b/deep/two.safetensors", inputs[0], out / "b/deep/two.safetensors"),
        ("three.safetensors", inputs[1], out / "three.safetensors"),
    ]
    assert {i.map_path for i in items} == {tmp_path / "map.yaml"}


def test_inputs_in_one_folder_and_relative_paths(tmp_path, monkeypatch):
    touch(tmp_path, "ckpts/deep/a.pth", "ckpts/deep/b.pt")
    monkeypatch.chdir(tmp_path)
    items = items_from_inputs(
        [Path("ckpts/deep/b.pt"), Path("ckpts/deep/a.pth")], Path("m.yaml"), Path("o")
    )
    assert [(i.relative, i.output) for i in items] == [
        ("a.safetensors", Path("o/a.safetensors")),
        ("b.safetensors", Path("o/b.safetensors")),
    ]


def test_inputs_problems(tmp_path):
    touch(tmp_path, "x.pth", "x.safetensors", "y.pth")
    with pytest.raises(ManifestError) as caught:
        items_from_inputs(
            [tmp_path / "gone.pth", tmp_path / "y.pth", tmp_path / "also_gone.pt"],
            tmp_path / "map.yaml",
            tmp_path / "out",
        )
    assert caught.value.problems == [
        f"{tmp_path / 'gone.pth'}: no such file",
        f"{tmp_path / 'also_gone.pt'}: no such file",
    ]
    with pytest.raises(ManifestError, match="would both be written to"):
        items_from_inputs(
            [tmp_path / "x.pth", tmp_path / "x.safetensors"], tmp_path / "m.yaml", tmp_path / "o"
        )
    with pytest.raises(ManifestError, match="matched twice"):
        items_from_inputs(
            [tmp_path / "y.pth", tmp_path / "." / "y.pth"], tmp_path / "m.yaml", tmp_path / "o"
        )


# --------------------------------------------------------------------------------- shards


def _items(count: int) -> list[BatchItem]:
    return [
        BatchItem(f"m{i:03d}.safetensors", Path(f"in/m{i:03d}.pth"), Path("map.yaml"),
                  Path(f"out/m{i:03d}.safetensors"))
        for i in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 10, 31])
def test_shards_are_disjoint_and_cover_every_item_once(count):
    items = _items(count)
    shards = [select_shard(items, i, 3) for i in (1, 2, 3)]
    together = [item for shard in shards for item in shard]
    assert sorted(together) == sorted(items)  # every item exactly once
    assert len(together) == len(set(together)) == count
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(shards[a]) & set(shards[b])
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced
    assert select_shard(items, 1, 1) == tuple(sorted(items))


def test_shards_do_not_depend_on_the_input_order():
    items = _items(20)
    reference = [select_shard(items, i, 3) for i in (1, 2, 3)]
    for seed in range(5):
        shuffled = items[:]
        random.Random(seed).shuffle(shuffled)
        assert [select_shard(shuffled, i, 3) for i in (1, 2, 3)] == reference
    assert reference[0][:2] == (items[0], items[3])


# ------------------------------------------------------------------ formats (issue 10)


def test_a_glob_takes_every_readers_suffix_and_of_json_files_only_model_json(tmp_path):
    names = (
        "a.safetensors", "b.pt", "c.pth", "d.bin", "e.ckpt", "f.pth.tar", "g.tar",
        "h.keras", "i.weights.h5", "j.hdf5", "k.onnx", "l.caffemodel", "m.npz", "n.npy",
        "web/model.json", "web/MODEL.JSON",
    )  # fmt: skip
    ignored = ("config.json", "web/weights_manifest.json", "notes.txt", "map.yaml", "x.pb")
    touch(tmp_path, *names, *ignored)
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "m.yaml").write_text(MAP)
    path = manifest(
        tmp_path, "version: 1\noutput_dir: out\njobs: [{inputs: '**/*', map: maps/m.yaml}]\n"
    )
    items = read_manifest(path)
    assert sorted(str(i.input.relative_to(tmp_path)) for i in items) == sorted(names)
    assert {i.format for i in items} == {None}


def test_a_group_format_takes_every_file_its_glob_matches(tmp_path):
    # format: says what the files are: their suffixes play no part (a caffemodel named .bin,
    # weights.data), and every match is read as that format, the manifest itself excepted.
    touch(tmp_path, "caffe/net.bin", "caffe/weights.data", "caffe/.net.bin.0123abcd.tmp")
    (tmp_path / "m.yaml").write_text(MAP)
    path = manifest(
        tmp_path,
        "version: 1\noutput_dir: out\njobs:\n"
        "  - {inputs: 'caffe/*', map: m.yaml, format: caffe}\n"
        "  - {inputs: '*.yaml', map: m.yaml, format: numpy}\n",
    )
    items = read_manifest(path)
    assert [(i.input.relative_to(tmp_path).as_posix(), i.format) for i in items] == [
        ("caffe/net.bin", "caffe"),
        ("caffe/weights.data", "caffe"),
        ("m.yaml", "numpy"),  # matched and asked for; not the manifest.yaml itself
    ]


def test_formats_are_per_group(zoo):
    path = manifest(
        zoo,
        "version: 1\noutput_dir: out\njobs:\n"
        "  - {inputs: 'vgg/*.pth', map: ../maps/vgg.yaml, format: torch}\n"
        "  - {inputs: 'alex/*.safetensors', map: ../maps/alex.yaml}\n"
        "  - {inputs: 'vgg/deep/*.pth', map: ../maps/vgg.yaml, format: null}\n",
    )
    assert {i.relative: i.format for i in read_manifest(path)} == {
        "alex/x.safetensors": None,
        "vgg/a.safetensors": "torch",
        "vgg/deep/c.safetensors": None,
    }


@pytest.mark.parametrize(
    ("value", "shown"),
    [("pickle", "'pickle'"), ("Torch", "'Torch'"), ("3", "3"), ("[onnx]", "['onnx']")],
)
def test_an_unknown_format_names_the_file_group_and_key(zoo, value, shown):
    path = manifest(
        zoo,
        "version: 1\noutput_dir: out\njobs:\n"
        "  - {inputs: 'alex/*.safetensors', map: ../maps/alex.yaml}\n"
        f"  - {{inputs: 'vgg/*.pth', map: ../maps/vgg.yaml, format: {value}}}\n",
    )
    assert problems_of(path) == [
        f"{path}: jobs[1]: format: unknown format {shown}; expected one of "
        "safetensors, torch, keras, onnx, caffe, tfjs, numpy"
    ]


def test_inputs_on_the_command_line_carry_the_format(tmp_path):
    touch(tmp_path, "a.bin", "b.weights")
    items = items_from_inputs(
        [tmp_path / "b.weights", tmp_path / "a.bin"], tmp_path / "m.yaml", tmp_path / "o", "caffe"
    )
    assert [(i.relative, i.format) for i in items] == [
        ("a.safetensors", "caffe"),
        ("b.safetensors", "caffe"),
    ]
    (item,) = items_from_inputs([tmp_path / "a.bin"], tmp_path / "m.yaml", tmp_path / "o")
    assert item.format is None


def test_the_manifest_knows_the_readers_formats_and_suffixes():
    from fc2conv_cli.manifest import CHECKPOINT_SUFFIXES, FORMATS
    from fc2conv_cli.readers.detect import FORMATS as READERS_FORMATS
    from fc2conv_cli.readers.detect import SUFFIXES

    assert FORMATS == READERS_FORMATS
    assert sorted(CHECKPOINT_SUFFIXES) == sorted(suffix for suffix, _ in SUFFIXES)


def test_a_folder_beside_the_manifest_does_not_hide_a_shipped_map(tmp_path):
    from fc2conv_cli.manifest import read_manifest

    (tmp_path / "vgg16").mkdir()
    (tmp_path / "vgg16" / "a.safetensors").write_bytes(b"")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(
        'version: 1\noutput_dir: out\njobs:\n  - {inputs: "vgg16/*.safetensors", map: vgg16}\n'
    )
    (item,) = read_manifest(manifest)
    assert item.map_path.parent.name == "sample_configs" and item.map_path.name == "vgg16.yaml"
