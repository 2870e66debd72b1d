import io
import os

import pytest

from m2f_cli.errors import InputError
from m2f_cli.inputs.walk import read_path_list, walk


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")


def test_folder_walk_sorted_mirrored_hidden_skipped(tmp_path):
    for rel in ("b/img.jpg", "a/img.jpg", "a/Z.PNG", "top.webp", ".hidden/x.jpg", "a/.h.jpg", "notes.txt"):
        _touch(tmp_path / "in" / rel)
    res = walk([str(tmp_path / "in")])
    assert [r.rel for r in res.refs] == ["a/Z", "a/img", "b/img", "top"]
    assert [r.name for r in res.refs] == ["a/Z.PNG", "a/img.jpg", "b/img.jpg", "top.webp"]
    assert not res.failures


def test_same_stem_keeps_extensions(tmp_path):
    for rel in ("img.jpg", "img.png", "other.jpg"):
        _touch(tmp_path / rel)
    res = walk([str(tmp_path)])
    assert sorted(r.rel for r in res.refs) == ["img.jpg", "img.png", "other"]


def test_same_name_under_two_folders_is_a_failure_not_an_overwrite(tmp_path):
    _touch(tmp_path / "x" / "img.jpg")
    _touch(tmp_path / "y" / "img.jpg")
    res = walk([str(tmp_path / "x"), str(tmp_path / "y")])
    assert [r.path for r in res.refs] == [str(tmp_path / "x" / "img.jpg")]
    assert len(res.failures) == 1 and "same output name" in res.failures[0].error


def test_same_file_twice_is_processed_once(tmp_path):
    _touch(tmp_path / "img.jpg")
    res = walk([str(tmp_path), str(tmp_path / "img.jpg")])
    assert len(res.refs) == 1 and not res.failures


def test_file_args_absolute_and_dotdot_stay_inside_out(tmp_path, monkeypatch):
    _touch(tmp_path / "d" / "e" / "p.jpg")
    monkeypatch.chdir(tmp_path / "d" / "e")
    res = walk([str(tmp_path / "d" / "e" / "p.jpg"), "../e/p.jpg", "p.jpg"])
    (ref,) = res.refs  # all three are one file
    assert not ref.rel.startswith("/") and ".." not in ref.rel.split("/")
    monkeypatch.chdir(tmp_path / "d")
    assert walk(["e/p.jpg"]).refs[0].rel == "e/p"
    assert walk(["./e/../e/p.jpg"]).refs[0].rel == "e/p"


def test_globs_and_missing(tmp_path):
    for rel in ("a1.jpg", "a2.png", "b.jpg"):
        _touch(tmp_path / rel)
    res = walk([str(tmp_path / "a*")])
    assert [os.path.basename(r.path) for r in res.refs] == ["a1.jpg", "a2.png"]
    with pytest.raises(InputError):
        walk([str(tmp_path / "nothing*.jpg")])
    with pytest.raises(InputError):
        walk([str(tmp_path / "missing.jpg")])


def test_symlinks_broken_and_loops(tmp_path):
    root = tmp_path / "in"
    _touch(root / "ok.jpg")
    os.symlink(root / "gone.jpg", root / "broken.jpg")
    os.symlink(root, root / "loop")  # a folder that contains itself
    res = walk([str(root)])
    assert [r.rel for r in res.refs] == ["ok"]
    assert [f.error for f in res.failures] == ["broken symlink"]


def test_output_folder_is_not_walked(tmp_path):
    _touch(tmp_path / "img.jpg")
    _touch(tmp_path / "masks" / "img.png")
    res = walk([str(tmp_path)], exclude=str(tmp_path / "masks"))
    assert [r.rel for r in res.refs] == ["img"]


def test_odd_file_names(tmp_path):
    for name in ("with space.jpg", "ünïcödé.png", "new\nline.jpg"):
        _touch(tmp_path / name)
    res = walk([str(tmp_path)])
    assert sorted(r.rel for r in res.refs) == sorted(["with space", "ünïcödé", "new\nline"])


def test_read_path_list():
    assert read_path_list(io.StringIO("a.jpg\n\nb c.jpg\n")) == ["a.jpg", "b c.jpg"]
    assert read_path_list(io.StringIO("a.jpg\0new\nline.jpg\0"), null=True) == ["a.jpg", "new\nline.jpg"]


def test_nothing_under_out_is_an_input_whatever_names_it(tmp_path):
    _touch(tmp_path / "imgs" / "a.png")
    _touch(tmp_path / "imgs" / "masks" / "a.png")
    _touch(tmp_path / "imgs" / "masks" / "sub" / "b.png")
    out = str(tmp_path / "imgs" / "masks")
    for inputs in ([str(tmp_path / "imgs" / "**" / "*.png")],                     # a glob
                   [str(tmp_path / "imgs" / "a.png"), out + "/a.png", out + "/sub/b.png"],  # files (stdin)
                   [str(tmp_path / "imgs")], [out + "/sub"]):                       # folders
        res = walk(inputs, exclude=out)
        assert [r.path for r in res.refs] == ([] if inputs == [out + "/sub"] else [str(tmp_path / "imgs" / "a.png")])
        assert not res.failures


def test_names_never_collide_ignoring_case(tmp_path):
    _touch(tmp_path / "IMG.jpg")
    _touch(tmp_path / "img.png")
    res = walk([str(tmp_path)])
    assert sorted(r.rel for r in res.refs) == ["IMG.jpg", "img.png"]
    d = tmp_path / "two"
    _touch(d / "a" / "IMG.jpg")
    _touch(d / "b" / "img.JPG")
    res = walk([str(d / "a"), str(d / "b")])
    assert [r.rel for r in res.refs] == ["IMG"]
    assert len(res.failures) == 1 and "ignoring case" in res.failures[0].error


def test_files_that_are_not_images_are_counted_by_extension(tmp_path):
    _touch(tmp_path / "a.jpg")
    for name in ("notes.txt", "b.TXT", "c.raw", "README"):
        _touch(tmp_path / name)
    _touch(tmp_path / ".hidden.txt")
    res = walk([str(tmp_path)])
    assert [r.rel for r in res.refs] == ["a"]
    assert res.not_images == {".txt": 2, ".raw": 1, "": 1}
    assert res.not_images_line() == "4 files that are not an image (.txt 2, no extension 1, .raw 1)"
    heic = tmp_path / "phone"
    _touch(heic / "IMG_0001.HEIC")
    _touch(heic / "x.avif")
    assert sorted(r.rel for r in walk([str(heic)]).refs) == ["IMG_0001", "x"]


def test_nul_separated_paths_without_the_flag_are_explained():
    with pytest.raises(ValueError, match="pass -0"):
        read_path_list(io.StringIO("a.jpg\0b.jpg\0"))
