import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gen.input.captions import CaptionError, read_captions
from schemas import Caption, Reject


def _read(path, **kw):
    return list(read_captions(path, kw.pop("max_chars", 4000), **kw))


BAD_LINES = [
    (b"not json at all", "not valid JSON"),
    (b'{"id": "a1"}', "field 'text' is missing"),
    (b'{"text": "\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\xab"}', "field 'id' is missing"),
    (b'{"id": "a2", "text": ""}', "text is empty or whitespace"),
    (b'{"id": "a3", "text": "   \\t "}', "text is empty or whitespace"),
    (b'{"id": 7, "text": "\xe7\x8c\xab"}', "field 'id': Input should be a valid string"),
    (b'{"id": "a4", "text": 5}', "field 'text': Input should be a valid string"),
    (b'{"id": "a5", "text": "\xff\xfe bad"}', "invalid UTF-8"),
    (b'["a list"]', "expected a JSON object, got list"),
    (b'{"id": "a6", "text": "nul\\u0000here"}', "control character U+0000"),
    (b'{"id": "a7", "text": "' + "长".encode() * 5000 + b'"}', "over the limit of 4000"),
    (b'{"id": "", "text": "x"}', "field 'id'"),
    (b'[' * 100000 + b']' * 100000, "not valid JSON"),
]


@pytest.mark.parametrize("line,expected", BAD_LINES)
def test_each_bad_line_is_rejected_with_file_line_and_reason(tmp_path, line, expected):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "ok", "text": "\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\xab"}\n' + line + b"\n")
    out = _read(path)
    assert isinstance(out[0], Caption) and out[0].text == "一只猫"
    assert len(out) == 2 and isinstance(out[1], Reject), out
    assert out[1].line == 2 and out[1].file == str(path) and out[1].stage == "input"
    assert expected in out[1].reason
    assert out[1].raw is not None  # the rejected line is kept, not just its reason


def test_duplicate_id_names_the_first_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "x", "text": "猫"}\n{"id": "y", "text": "狗"}\n{"id": "x", "text": "鸟"}\n',
                    encoding="utf-8")
    out = _read(path)
    assert [type(r).__name__ for r in out] == ["Caption", "Caption", "Reject"]
    assert out[2].reason == "duplicate id 'x' (first seen on line 1)"


def test_bom_crlf_blank_lines_and_extra_fields(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "\xe7\x8c\xab", "src": {"k": 1}}\r\n\r\n'
                     b'{"id": "b", "text": "\xe7\x8b\x97"}\r\n')
    out = _read(path)
    assert [c.id for c in out] == ["a", "b"]
    assert out[0].extra == {"src": {"k": 1}}  # other fields ride along untouched


def test_strict_stops_at_first_bad_line_naming_it(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "text": "猫"}\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(CaptionError, match=r"in\.jsonl:2: field 'text' is missing"):
        _read(path, strict=True)


def test_parquet_input_with_row_numbers(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["猫", " ", "狗"], "lang": ["zh"] * 3}), path)
    out = _read(path)
    assert [type(r).__name__ for r in out] == ["Caption", "Reject", "Caption"]
    assert out[1].line == 2 and "empty" in out[1].reason
    assert out[2].extra == {"lang": "zh"}


def _compress(kind: str, data: bytes, path):
    import bz2, gzip, lzma  # noqa: E401
    if kind == "zstd":
        with pa.output_stream(str(path), compression="zstd") as out:
            out.write(data)
    else:
        path.write_bytes({"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[kind](data))
    return path


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bz2", "xz"])
def test_compressed_json_lines_read_as_the_plain_file_whatever_the_name(tmp_path, kind):
    from gen.generate.progress import count_lines
    lines = [json.dumps({"id": f"c{i}", "text": f"第{i}只狗"}, ensure_ascii=False) for i in range(5000)]
    data = ("\n".join(lines[:10] + ["{broken"] + lines[10:]) + "\n").encode()
    plain = tmp_path / "caps.jsonl"
    plain.write_bytes(data)
    packed = _compress(kind, data, tmp_path / "caps.data")   # a name that says nothing
    unnamed = lambda rs: [r.model_copy(update={"file": ""}) if isinstance(r, Reject) else r for r in rs]  # noqa: E731
    assert unnamed(_read(packed)) == unnamed(_read(plain)) and len(_read(plain)) == 5001
    assert [(r.line, r.file) for r in _read(packed) if isinstance(r, Reject)] == [(11, str(packed))]
    assert count_lines(packed) == count_lines(plain) == 5001


def test_parquet_is_found_by_its_bytes_not_its_name(tmp_path):
    path = tmp_path / "caps.pq"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["一只猫", "两只狗"]}), path)
    assert [c.text for c in _read(path)] == ["一只猫", "两只狗"]


def test_a_truncated_download_keeps_what_came_and_says_where_it_broke(tmp_path):
    import gzip
    lines = [json.dumps({"id": f"c{i}", "text": f"第{i}只狗在草地上奔跑"}, ensure_ascii=False) for i in range(20000)]
    whole = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "caps.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    out = _read(path)
    good = [r for r in out if isinstance(r, Caption)]
    *_, last = out
    assert 1000 < len(good) < 20000 and [c.id for c in good] == [f"c{i}" for i in range(len(good))]
    assert isinstance(last, Reject) and last.file == str(path) and last.line >= len(good) + 1
    assert "gzip data broken after line" in last.reason and "EOFError" in last.reason
    with pytest.raises(CaptionError, match="caps.jsonl.gz:.*gzip data broken"):
        _read(path, strict=True)


def test_reader_streams(tmp_path):
    # A generator: the first record is available before the file is read to the end.
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": "猫"}) + "\n" for i in range(1000)))
    it = read_captions(path, 4000)
    assert next(it).id == "0"


# The hostile-input corpus: every kind of line we have seen or can imagine, with what the
# reader must say (None: accepted as a caption). Counted in docs/reliability.md.
OK = b'{"id": "ok", "text": "\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\xab"}'
HOSTILE = {
    "not json": (b"hello", "not valid JSON"),
    "truncated json": (b'{"id": "t", "text": "\xe7\x8c', "invalid UTF-8"),
    "truncated object": (b'{"id": "t", "text": "abc', "not valid JSON"),
    "json string": (b'"just text"', "expected a JSON object, got str"),
    "json number": (b"42", "expected a JSON object, got int"),
    "json list": (b'[{"id": "a", "text": "b"}]', "expected a JSON object, got list"),
    "missing text": (b'{"id": "a"}', "field 'text' is missing"),
    "null text": (b'{"id": "a", "text": null}', "field 'text' is missing"),
    "missing id": (b'{"text": "b"}', "field 'id' is missing"),
    "empty text": (b'{"id": "a", "text": ""}', "text is empty or whitespace"),
    "whitespace text": (b'{"id": "a", "text": "\\u3000 \\t"}', "text is empty or whitespace"),
    "number id": (b'{"id": 12, "text": "b"}', "field 'id': Input should be a valid string"),
    "float id": (b'{"id": 1.5, "text": "b"}', "field 'id': Input should be a valid string"),
    "NaN id": (b'{"id": NaN, "text": "b"}', "field 'id': Input should be a valid string"),
    "bool id": (b'{"id": true, "text": "b"}', "field 'id': Input should be a valid string"),
    "empty id": (b'{"id": "", "text": "b"}', "field 'id': String should have at least 1 character"),
    "padded id": (b'{"id": " a", "text": "b"}', "id has leading or trailing whitespace"),
    "newline in id": (b'{"id": "a\\nb", "text": "b"}', "id contains a tab or line break (U+000A)"),
    "line separator in id": (b'{"id": "a\\u2028b", "text": "b"}', "id contains a tab or line break (U+2028)"),
    "paragraph separator in id": (b'{"id": "a\\u2029b", "text": "b"}', "id contains a tab or line break (U+2029)"),
    "300-char id": (b'{"id": "' + b"i" * 300 + b'", "text": "b"}', "at most 256 characters"),
    "object text": (b'{"id": "a", "text": {"zh": "b"}}', "field 'text': Input should be a valid string"),
    "invalid utf-8": (b'{"id": "a", "text": "\xc3\x28"}', "invalid UTF-8 at byte"),
    "latin-1 line": ('{"id": "a", "text": "café"}'.encode("latin-1"), "invalid UTF-8"),
    "NUL in text": (b'{"id": "a", "text": "x\\u0000y"}', "control character U+0000"),
    "raw NUL bytes": (b'\x00\x00{"id": "a", "text": "b"}', "not valid JSON"),
    "escape sequence": (b'{"id": "a", "text": "\\u001b[31mred"}', "control character U+001B"),
    "lone surrogate": (b'{"id": "a", "text": "\\ud800x"}', "unpaired surrogate"),
    "1 MB caption": (b'{"id": "a", "text": "' + b"x" * 1_000_000 + b'"}', "over the limit of 4000"),
    "deeply nested": (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    "5,000-digit number": (b'{"id": "a", "text": "b", "n": ' + b"9" * 5000 + b'}', "not readable JSON: Exceeds the limit"),
    "duplicate id": (OK, "duplicate id 'ok' (first seen on line 1)"),
    "id equal after NFKC": ('{"id": "ｏｋ", "text": "猫"}'.encode(), "as 'ok' after Unicode normalisation"),
    # accepted: odd but real captions
    "emoji only": ('{"id": "e", "text": "🐱🐶🌸"}'.encode(), None),
    "traditional Chinese": ('{"id": "t", "text": "圖片顯示一隻貓在陽台上曬太陽"}'.encode(), None),
    "HTML": (b'{"id": "h", "text": "<b>\\u732b</b><script>alert(1)</script>"}', None),
    "template syntax": (b'{"id": "j", "text": "{{ 7*7 }} {% raw %}"}', None),
    "extra fields": (b'{"id": "x", "text": "b", "url": "http://e/1.jpg", "n": [1, 2]}', None),
    "tabs and newlines in text": (b'{"id": "n", "text": "line1\\nline2\\tend"}', None),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_input_corpus(tmp_path, kind):
    line, expected = HOSTILE[kind]
    path = tmp_path / "in.jsonl"
    path.write_bytes(OK + b"\n" + line + b"\n")
    out = _read(path)
    assert isinstance(out[0], Caption) and len(out) == 2
    if expected is None:
        assert isinstance(out[1], Caption)
    else:
        assert isinstance(out[1], Reject) and out[1].line == 2, out[1]
        assert expected in out[1].reason


def test_nan_and_infinity_in_extra_fields_ride_along_as_null(tmp_path):
    """Python's json writes them and parquet holds them (pandas' "missing"), JSON has no
    spelling for them: captions.parquet's extra column must stay JSON every reader parses."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "text": "b", "score": NaN, "m": {"x": [1, -Infinity]}}\n')
    pq.write_table(pa.table({"id": ["p"], "text": ["q"], "score": [float("nan")]}), tmp_path / "in.parquet")
    (a,), (p,) = _read(path), _read(tmp_path / "in.parquet")
    assert a.extra == {"score": None, "m": {"x": [1, None]}} and p.extra == {"score": None}
    json.dumps(a.extra, allow_nan=False)


def test_corpus_is_at_least_25_kinds_of_bad_line():
    assert sum(expected is not None for _, expected in HOSTILE.values()) >= 25
