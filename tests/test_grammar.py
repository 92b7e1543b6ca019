"""JSON-schema constrained output (llguidance): every reply parses and validates, greedy or sampled."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                                      "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]},
                                               "maxItems": 3}},
     "required": ["name", "age", "pets"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 999}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": {"anyOf": [{"type": "null"},
                                                                                       {"type": "string",
                                                                                        "maxLength": 30}]}},
     "required": ["ok", "reason"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def smollm2(smollm2_int4_dir):
    import edgeact

    return edgeact.load(smollm2_int4_dir, threads=1)


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_replies_parse_and_validate(smollm2, i):
    schema = SCHEMAS[i]
    prompt = smollm2.chat_ids("Answer in JSON: tell me about someone you know.")
    greedy = smollm2.generate(prompt, max_new_tokens=96, json_schema=schema)
    jsonschema.validate(json.loads(greedy.text), schema)
    assert greedy.finish_reason == "eos"
    session = smollm2.session()
    for seed in range(3):  # sampled: the mask holds whatever is drawn
        r = session.generate(prompt, max_new_tokens=96, temperature=1.0, seed=seed, json_schema=json.dumps(schema))
        jsonschema.validate(json.loads(r.text), schema)


def test_unconstrained_reply_is_not_json_so_the_mask_does_the_work(smollm2):
    prompt = smollm2.chat_ids("Answer in JSON: tell me about someone you know.")
    text = smollm2.generate(prompt, max_new_tokens=40).text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_rejected_schemas_are_value_errors(smollm2):
    for bad in ({"type": "no-such-type"}, "{not json", [1, 2]):
        with pytest.raises(ValueError, match="JSON schema"):
            smollm2.generate([1, 2, 3], max_new_tokens=4, json_schema=bad)


def test_cli_json_schema(smollm2_int4_dir, tmp_path, capsys):
    from edgeact.cli import main

    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMAS[0]))
    assert main(["run", str(smollm2_int4_dir), "-p", "Invent a person.", "-n", "80", "--json-schema",
                 str(path)]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMAS[0])
    path.write_text("{oops")
    assert main(["run", str(smollm2_int4_dir), "-p", "x", "--json-schema", str(path)]) == 2
    assert "schema.json" in capsys.readouterr().err
