"""pace_lm.files.atomic: a folder replaced whole, the old one kept aside until the new one is in place."""

import os

from pace_lm.files.atomic import replace_folder, write_json_atomic


def test_a_folder_takes_the_place_of_another_and_the_old_one_goes(tmp_path):
    out, tmp, aside = tmp_path / "out", tmp_path / "out.tmp", tmp_path / "out.old"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    replace_folder(str(tmp), str(out), str(aside))
    assert os.listdir(out) == ["new.txt"] and not tmp.exists() and not aside.exists()


def test_an_empty_or_missing_target_is_simply_filled(tmp_path):
    for target in (tmp_path / "empty", tmp_path / "missing"):
        if target.name == "empty":
            target.mkdir()
        tmp = tmp_path / f"{target.name}.tmp"
        tmp.mkdir()
        (tmp / "f").write_text("x")
        replace_folder(str(tmp), str(target), str(tmp_path / "aside"))
        assert os.listdir(target) == ["f"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "missing"]


def test_json_is_written_whole_and_readable_by_others(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(str(path), {"a": float("nan")})
    assert path.read_text().startswith("{") and oct(path.stat().st_mode & 0o044) != "0o0"
    assert [p for p in os.listdir(path.parent)] == ["r.json"]  # no temporary left


def test_what_a_writer_killed_mid_swap_left_is_put_right(tmp_path):
    out, aside = tmp_path / "out", tmp_path / "out.old"
    for left_out in (False, True):  # killed between the renames (out missing), or after them
        aside.mkdir()
        (aside / "old.txt").write_text("old")
        if left_out:
            out.mkdir(exist_ok=True)
        tmp = tmp_path / "out.tmp"
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        replace_folder(str(tmp), str(out), str(aside))
        assert os.listdir(out) == ["new.txt"] and not aside.exists() and not tmp.exists()
