"""Text clean-up (pipeline.text.clean_text): the control-character rule, and what clean-up does."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from fusionrec.pipeline.encoders.text import clean_text, controls_as_spaces


def per_character(text: str) -> str:
    """The rule as first written: every code point of category C becomes a space."""
    return "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)


def test_controls_are_exactly_unicode_category_c() -> None:
    every = "".join(chr(cp) for cp in range(0x110000))
    assert controls_as_spaces(every) == per_character(every)  # all 1,114,112 code points
    for cp in range(0x110000):  # one at a time: the fast path (ASCII table, printable text) too
        assert controls_as_spaces(f"a{chr(cp)}b") == per_character(f"a{chr(cp)}b"), hex(cp)
    assert controls_as_spaces("a\x00b\u200bc\ue000d\U000e0080e\udc80f\ng\th") == "a b c d e f g h"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec=None), max_size=60))
def test_clean_text_matches_the_per_character_rule(text: str) -> None:
    import html
    import re

    from fusionrec.pipeline.encoders.text import _SPACE_BEFORE_PUNCT_RE, _SPACE_RE, _TAG_RE

    expected = per_character(unicodedata.normalize("NFKC", html.unescape(_TAG_RE.sub(" ", text)))) if text else ""
    expected = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", _SPACE_RE.sub(" ", expected)).strip()
    assert clean_text(text) == expected
    assert not re.search(r"\s{2}", clean_text(text))


def test_clean_text_examples() -> None:
    assert clean_text("<b>Bold</b> &amp; loud ,\nnew\tline\x07!") == "Bold & loud, new line!"
    assert clean_text("ﬁne café") == "fine café"  # NFKC folds the ligature
    assert clean_text(None) == "" and clean_text("  \u200b ") == ""
