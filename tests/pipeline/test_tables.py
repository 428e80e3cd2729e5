"""Input tables: each kind of bad input names the file, the row and the field."""

from pathlib import Path

import polars as pl
import pytest

from fusionrec.pipeline.errors import InputError, MediaError
from fusionrec.pipeline.io.tables import load_interactions, load_items, load_users, read_interactions, resolve_media


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def items(tmp_path: Path) -> pl.DataFrame:
    write(tmp_path / "items.csv", "item_id,title,tags,price\na,Sea,x|y,3.5\nb,,,\n")
    return load_items(tmp_path)


def test_items_read_and_typed(tmp_path: Path) -> None:
    df = items(tmp_path)
    assert df["item_id"].to_list() == ["a", "b"]
    assert df["title"].to_list() == ["Sea", None]  # empty cells are missing values
    assert "price" in df.columns  # other columns are kept as attributes


def test_parquet_preferred_and_int_ids_accepted(tmp_path: Path) -> None:
    pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"]}).write_parquet(tmp_path / "items.parquet")
    write(tmp_path / "items.csv", "item_id\nzzz\n")
    assert load_items(tmp_path)["item_id"].to_list() == ["1", "2"]


@pytest.mark.parametrize(("table", "content", "pattern"), [
    ("items.csv", "title\nx\n", r"items.csv, field 'item_id': required column is missing"),
    ("items.csv", "item_id,title\na,x\nb,y\na,z\n", r"items.csv, row 3, field 'item_id': duplicate id 'a' \(first on row 1\)"),
    ("items.csv", "item_id,title\na,x\n,y\n", r"items.csv, row 2, field 'item_id': missing id"),
    ("items.csv", "", r"items.csv: the file is empty"),
    ("items.csv", "item_id,title\n", r"items.csv: the table has no rows"),
    ("items.csv", b"item_id,title\na,ok\nb,caf\xe9\n", r"items.csv, row 2, field 'title': invalid UTF-8 at byte \d+ \(line 3\)"),
    ("items.csv", 'item_id,title\na,"unclosed\nb,x\n', r"items.csv, row 1, field 'title': cannot parse the table: stray quote: a quoted cell is never closed"),
    ("users.csv", "user_id,text\nu,a\nu,b\n", r"users.csv, row 2, field 'user_id': duplicate id 'u'"),
])
def test_bad_tables(tmp_path: Path, table: str, content, pattern: str) -> None:
    if table != "items.csv":
        write(tmp_path / "items.csv", "item_id\na\n")
    write(tmp_path / table, content)
    with pytest.raises(InputError, match=pattern) as info:
        load_items(tmp_path) if table == "items.csv" else load_users(tmp_path)
    assert info.value.exit_code == 2


def test_huge_text_field_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", "item_id,description\na,short\nb," + "x" * 1_000_001 + "\n")
    with pytest.raises(InputError, match=r"row 2, field 'description': text longer than 1,000,000 characters"):
        load_items(tmp_path)


def test_interactions_types_and_defaults(tmp_path: Path) -> None:
    df_items = items(tmp_path)
    write(tmp_path / "interactions.csv",
          "user_id,item_id,timestamp,event,value\nu1,a,1700000000,PURCHASE,\nu1,b,2024-01-02T03:04:05Z,,4\n"
          "u2,a,2024-01-02,View,\n")
    df = load_interactions(tmp_path, df_items)
    assert df.schema == {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "event": pl.String,
                         "value": pl.Float64}
    assert df["timestamp"].to_list() == [1700000000, 1704164645, 1704153600]
    assert df["event"].to_list() == ["purchase", "interact", "view"]
    assert df["value"].to_list() == [None, 4.0, None]


@pytest.mark.parametrize(("content", "pattern"), [
    ("user_id,item_id\nu,a\n", r"field 'timestamp': required column is missing"),
    ("user_id,item_id,timestamp\nu,a,1\nu,a,yesterday\n", r"row 2, field 'timestamp': cannot read timestamp 'yesterday'"),
    ("user_id,item_id,timestamp\nu,a,1\nu,zz,2\n", r"row 2, field 'item_id': item 'zz' is not in the items table"),
    ("user_id,item_id,timestamp,value\nu,a,1,5\nu,a,2,lots\n", r"row 2, field 'value': expected a number, found 'lots'"),
])
def test_bad_interactions(tmp_path: Path, content: str, pattern: str) -> None:
    df_items = items(tmp_path)
    write(tmp_path / "interactions.csv", content)
    with pytest.raises(InputError, match=pattern):
        load_interactions(tmp_path, df_items)


def test_media_paths_stay_inside(tmp_path: Path) -> None:
    write(tmp_path / "data" / "img" / "a.png", b"x")
    write(tmp_path / "outside.png", b"x")
    (tmp_path / "data" / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    assert resolve_media(tmp_path / "data", "img/a.png") == (tmp_path / "data" / "img" / "a.png").resolve()
    with pytest.raises(MediaError, match="path leads outside the data directory"):
        resolve_media(tmp_path / "data", "../outside.png")
    with pytest.raises(MediaError, match="symlink points outside the data directory"):
        resolve_media(tmp_path / "data", "img/link.png")
    with pytest.raises(MediaError, match="absolute path refused"):
        resolve_media(tmp_path / "data", str(tmp_path / "outside.png"))


def test_a_held_out_path_that_is_a_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory, not a file"):
        read_interactions(tmp_path)


def test_a_misspelt_content_column_is_named_not_silently_an_attribute(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A newcomer's `img` for `image` dropped the images with no word, and doctor said ok."""
    write(tmp_path / "items.csv", "item_id,titel,img,price,genre\ni1,A film,a.jpg,3,drama\n")
    write(tmp_path / "users.csv", "user_id,txt,age,gender,occupation\nu1,hello,30,F,writer\n")
    with caplog.at_level("WARNING", logger="fusionrec.tables"):
        assert load_items(tmp_path)["img"].to_list() == ["a.jpg"]  # kept, as an attribute
        load_users(tmp_path)
    text = caplog.text
    for column, meant in (("titel", "title"), ("img", "image"), ("txt", "text")):
        assert (f"column {column!r} is kept as an attribute, not read as {meant!r} (there is no {meant!r} column, "
                f"so that content is not embedded): rename it if {meant!r} was meant") in text, text
    for attribute in ("price", "genre", "age", "gender", "occupation"):
        assert f"column {attribute!r}" not in text


def test_doctor_warns_about_a_misspelt_content_column(tmp_path: Path) -> None:
    from fusionrec.doctor import _data_checks

    write(tmp_path / "items.csv", "item_id,title,img\ni1,A film,a.jpg\n")
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu1,i1,1\n")
    checks = {c.name: c for c in _data_checks(tmp_path)}
    assert checks["items columns"].status == "warn"
    assert "'img' is kept as an attribute, not read as 'image'" in checks["items columns"].detail


def test_doctor_checks_ray_only_where_the_run_would_use_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from fusionrec import doctor
    from fusionrec.pipeline.config import Config

    imported: list[str] = []
    monkeypatch.setattr(doctor, "_import_check", lambda module, dist: imported.append(module) or doctor.Check(
        f"import {module}", "ok", "?"))
    for stub in ("_weights_checks",):
        monkeypatch.setattr(doctor, stub, lambda config: [])
    monkeypatch.setattr(doctor, "_cuda_check", lambda config: doctor.Check("cuda", "ok", ""))
    doctor.checks(Config(), tmp_path / "art")
    assert "ray" not in imported
    doctor.checks(dataclasses.replace(Config(), engine="ray"), tmp_path / "art")
    assert imported.count("ray") == 1
