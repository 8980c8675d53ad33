"""One definition of "the same query": curation's column normaliser is schemas.text.normalize."""
from __future__ import annotations

import polars as pl

from curate_helpers import sample_captions
from gen.curate.normalize import char_ngrams, normalized, search_terms, tokenize
from schemas.text import normalize

TRICKY = ["燃气表", "燃气表。", "ＡＢＣ燃气表！", " 燃 气 表 ", "《求是》", "GDP（国内生产总值）", "5.22公里",
          "Café ﬁ", "\u3000全角空格\u3000", "", "！！！", "A\tB\nC"]


def test_column_normaliser_agrees_with_schemas_text():
    texts = TRICKY + [c["text"] for c in sample_captions()]
    got = normalized(pl.Series("t", texts)).to_list()
    assert got == [normalize(t) for t in texts]


def test_full_width_case_and_punctuation_fold_to_one_form():
    forms = normalized(pl.Series(["燃气表", "燃气表。", " 燃 气 表 ", "“燃气表”"])).unique()
    assert forms.to_list() == ["燃气表"]
    assert normalize("ＡＢＣ") == normalize("abc")


def test_short_strings_keep_their_own_signature():
    df = pl.DataFrame({"k": [1, 2, 3], "t": ["猫", "狗", "燃气表"]})
    grams = char_ngrams(df, "k", "t", 2)
    by_key = {k: set(g) for k, g in grams.group_by("k").agg(pl.col("gram")).iter_rows()}
    assert by_key[1] == {"猫"} and by_key[2] == {"狗"}   # not one shared empty signature
    assert by_key[3] == {"燃气", "气表"}


def test_tokenize_is_per_distinct_text_and_ordered():
    texts = ["男子在公园下棋", "燃气表", "男子在公园下棋"]
    out = tokenize(texts)
    assert out[0] == out[2] and "".join(out[0]) == texts[0] and "".join(out[1]) == "燃气表"


def test_search_terms_add_dictionary_subwords():
    terms = search_terms(["燃气表"])
    assert "燃气" in terms and terms[-1] == "燃气表"
