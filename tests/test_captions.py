import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gen.captions import CaptionError, read_captions
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


def test_reader_streams(tmp_path):
    # A generator: the first record is available before the file is read to the end.
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": "猫"}) + "\n" for i in range(1000)))
    it = read_captions(path, 4000)
    assert next(it).id == "0"
