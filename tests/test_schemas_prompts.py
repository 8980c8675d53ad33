import json

import pytest
from pydantic import ValidationError

from gen.generate.prompts import PromptError, PromptSet
from gen.generate.validate import AnswerError, parse_answer, salvage
from schemas import Caption, CaptionQueries, answer_json_schema, decoding_constraints, is_short

CAPTION = "公园里一位老人在下象棋"
GOOD = {
    "entities": [{"text": "老人", "kind": "person", "hypernyms": ["人"], "grade": 2},
                 {"text": "象棋", "kind": "object", "hypernyms": ["棋类", "游戏"], "grade": 2}],
    "events": [{"text": "下象棋", "grade": 2}],
    "conjunctions": [{"text": "老人和象棋", "grade": 2}],
    "simple_conditions": [{"text": "公园里的老人", "grade": 2}],
    "complex_conditions": [{"text": "公园里下象棋的老人", "grade": 1}],
    "summaries": ["老人在公园下棋"],
}


def test_schema_has_no_refs_and_requires_every_key():
    schema = answer_json_schema()
    assert "$ref" not in json.dumps(schema) and "$defs" not in schema
    assert set(schema["required"]) == set(GOOD)
    ent = schema["properties"]["entities"]["items"]
    assert ent["properties"]["kind"]["enum"] == ["object", "person", "place", "concept"]
    assert schema["properties"]["entities"]["maxItems"] == 10


LONG_CAPTION = "傍晚的公园里，一位戴帽子的老人在石桌旁和朋友下象棋"


def test_a_caption_short_enough_to_be_its_own_summary_is_asked_for_none():
    assert is_short(CAPTION) and not is_short(LONG_CAPTION)
    full, short = answer_json_schema(), answer_json_schema(short=True)
    assert full["properties"]["summaries"]["minItems"] == 1
    assert short["properties"]["summaries"]["maxItems"] == 0
    assert {k: v for k, v in short["properties"].items() if k != "summaries"} == \
        {k: v for k, v in full["properties"].items() if k != "summaries"}
    # the fingerprint's record of the schema names both constraints and the rule between them
    assert decoding_constraints() == {"caption": full, "short_caption": short, "short_caption_chars": 16}
    none = json.dumps({**GOOD, "summaries": []}, ensure_ascii=False)
    assert parse_answer(none, CAPTION).summaries == []
    with pytest.raises(AnswerError, match="at least one summary"):
        parse_answer(none, LONG_CAPTION)
    # a server without a grammar may still give a short caption a summary: kept if valid
    assert parse_answer(json.dumps(GOOD, ensure_ascii=False), CAPTION).summaries == GOOD["summaries"]


def test_flattened_queries_carry_type_grade_and_salience():
    rows = CaptionQueries.model_validate(GOOD, context={"caption": CAPTION}).queries()
    by = {(r["type"], r["query"]): r for r in rows}
    assert by[("entity", "象棋")]["salience"] == 2 and by[("entity", "象棋")]["subtype"] == "object"
    hyper = by[("hypernym", "游戏")]
    assert hyper["source"] == "象棋" and hyper["grade"] == 2 and hyper["salience"] == 3
    assert by[("complex_condition", "公园里下象棋的老人")]["grade"] == 1
    assert by[("summary", "老人在公园下棋")]["grade"] == 2
    assert len(rows) == 10


@pytest.mark.parametrize("mutate,expected", [
    (lambda a: a["events"].append({"text": "公园里，一位老人在下象棋。", "grade": 2}), "repeats the whole caption"),
    (lambda a: a["events"].append({"text": "   ", "grade": 2}), "query is empty"),
    (lambda a: a["events"].append({"text": "长" * 33, "grade": 2}), "at most 32 characters"),
    (lambda a: a.__setitem__("entities", []), "at least 1 item"),
    (lambda a: a["entities"][0].__setitem__("kind", "animal"), "'object', 'person', 'place' or 'concept'"),
    (lambda a: a["events"][0].__setitem__("grade", 3), "Input should be 1 or 2"),
    (lambda a: a.__setitem__("extra_key", []), "Extra inputs are not permitted"),
])
def test_validators_reject_what_the_grammar_cannot_express(mutate, expected):
    answer = json.loads(json.dumps(GOOD))
    mutate(answer)
    with pytest.raises(AnswerError) as err:
        parse_answer(json.dumps(answer, ensure_ascii=False), CAPTION)
    assert expected in str(err.value)


def test_salvage_drops_only_the_invalid_queries_and_says_why():
    answer = json.loads(json.dumps(GOOD))
    answer["summaries"] = [CAPTION]                       # a short caption's own summary
    answer["entities"][1]["hypernyms"].append("长" * 33)  # one hypernym too long
    answer["entities"].append({"text": CAPTION, "kind": "object", "hypernyms": ["东西"], "grade": 2})
    answer["events"].insert(0, {"text": " ", "grade": 2})
    answer["conjunctions"].append({"text": "老人、象棋" * 7, "grade": 1})
    with pytest.raises(AnswerError):
        parse_answer(json.dumps(answer, ensure_ascii=False), CAPTION)
    kept, dropped = salvage(json.dumps(answer, ensure_ascii=False), CAPTION)
    assert kept["summaries"] == [] and [e["text"] for e in kept["entities"]] == ["老人", "象棋"]
    assert kept["entities"][1]["hypernyms"] == ["棋类", "游戏"]
    assert kept["events"] == GOOD["events"] and kept["conjunctions"] == GOOD["conjunctions"]
    # in the answer's order; an entity goes whole, with the hypernyms that depend on it
    assert [item for item, _ in dropped] == [
        "长" * 33, {"text": CAPTION, "kind": "object", "hypernyms": ["东西"], "grade": 2},
        {"text": " ", "grade": 2}, {"text": "老人、象棋" * 7, "grade": 1}, CAPTION]
    reasons = [why for _, why in dropped]
    assert "at most 32" in reasons[0] and "repeats the whole caption" in reasons[1]
    assert "empty" in reasons[2] and "repeats the whole caption" in reasons[4]


@pytest.mark.parametrize("text", [
    '{"queries": ["x"]}',                                                   # wrong shape
    json.dumps({**GOOD, "entities": [{"text": CAPTION, "kind": "object", "hypernyms": [], "grade": 2}]},
               ensure_ascii=False),                                         # no entity left
    json.dumps({**GOOD, "events": [{"text": "下棋", "grade": 5}]}, ensure_ascii=False),  # a bad grade
    '{"entities": [',                                                       # truncated
    None,
])
def test_salvage_keeps_an_answer_wrong_in_shape_rejected(text):
    assert salvage(text, CAPTION) is None


@pytest.mark.parametrize("wrap", [
    lambda s: s,
    lambda s: f"```json\n{s}\n```",
    lambda s: f"<think>\n先想一想 {{not json}}\n</think>\n{s}",
])
def test_answer_found_inside_fences_and_think_blocks(wrap):
    text = wrap(json.dumps(GOOD, ensure_ascii=False))
    assert parse_answer(text, CAPTION).events[0].text == "下象棋"


def test_refusal_and_truncation_are_explained():
    with pytest.raises(AnswerError, match="refused: no"):
        parse_answer("", CAPTION, refusal="no")
    with pytest.raises(AnswerError, match="not valid JSON"):
        parse_answer(json.dumps(GOOD)[:-10] + "}", CAPTION)


def test_caption_is_data_never_template_source():
    prompts = PromptSet()
    hostile = "{{ 7*7 }} {% for x in range(3) %}x{% endfor %} {{ ''.__class__.__mro__ }}"
    msgs = prompts.messages(Caption(id="x", text=hostile))
    assert hostile in msgs[-1]["content"]  # rendered literally, nothing evaluated
    assert "49" not in msgs[-1]["content"]


def test_fixed_part_first_caption_last():
    prompts = PromptSet()
    a = prompts.messages(Caption(id="a", text="一只猫"))
    b = prompts.messages(Caption(id="b", text="两只狗"))
    assert a[0] == b[0] and a[0]["role"] == "system"
    assert a[-1]["content"].rstrip().endswith("输出：") and "一只猫" in a[-1]["content"]
    # the shared prefix is nearly the whole prompt: what a prefix cache reuses
    shared = len(a[0]["content"])
    assert shared / (shared + len(a[1]["content"])) > 0.9


def test_strict_undefined_and_template_digest(tmp_path):
    for name in ("queries.system.j2", "repair.j2"):
        (tmp_path / name).write_text("固定说明 {{ error if error is defined else '' }}")
    (tmp_path / "queries.user.j2").write_text("描述：{{ caption.txt }}")  # typo: txt
    with pytest.raises(PromptError, match=r"queries.user.j2:1: .*'txt'"):  # at start-up, not per caption
        PromptSet(tmp_path)
    (tmp_path / "queries.user.j2").write_text("描述：{{ caption.text }}")
    first = PromptSet(tmp_path).digest
    (tmp_path / "queries.user.j2").write_text("描述：{{ caption.text }}。")
    assert PromptSet(tmp_path).digest != first


def test_repair_messages_show_the_error_after_the_bad_answer():
    prompts = PromptSet()
    first = prompts.messages(Caption(id="a", text="猫"))
    msgs = prompts.repair(first, "{bad", "the answer is not valid JSON")
    assert msgs[:2] == first and msgs[2] == {"role": "assistant", "content": "{bad"}
    assert "the answer is not valid JSON" in msgs[3]["content"]


def test_caption_model_is_strict_about_ids():
    with pytest.raises(ValidationError):
        Caption(id=12, text="猫")


def test_query_record_documents_the_written_columns():
    # export.py builds columns directly for speed; QueryRecord stays the documented row.
    from gen.export import QUERY_SCHEMA
    from schemas import QueryRecord
    assert QUERY_SCHEMA.names == list(QueryRecord.model_fields)


def test_flatten_of_the_stored_json_equals_the_models_rows():
    from schemas.answer import flatten
    model = CaptionQueries.model_validate(GOOD, context={"caption": CAPTION})
    assert flatten(json.loads(model.model_dump_json())) == model.queries() != []
