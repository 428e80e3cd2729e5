"""The shared error helpers: what one line of an error a user is shown."""

from __future__ import annotations

from fusionrec.pipeline.errors import InputError, first_line


def test_first_line_keeps_the_first_line_cut_to_the_limit() -> None:
    exc = ValueError("  bad value in column x\nTraceback-like detail\nmore  ")
    assert first_line(exc) == "bad value in column x"
    assert first_line(ValueError("a" * 500)) == "a" * 300
    assert first_line(ValueError("abcdef"), limit=3) == "abc"


def test_first_line_of_a_message_less_error_is_its_type_or_the_given_text() -> None:
    # `str(exc).splitlines()[0]` raised IndexError here, turning one clear error into a crash
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("   ")) == "OSError"
    assert first_line(RuntimeError(), empty="") == ""


def test_input_error_names_the_file_the_row_and_the_field() -> None:
    exc = InputError("not a number", file="data/items.csv", row=7, field="price")
    assert str(exc) == "data/items.csv, row 7, field 'price': not a number"
    assert exc.exit_code == 2
    assert str(InputError("no rows")) == "no rows"
