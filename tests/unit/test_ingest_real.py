"""Ingest on the real shared samples (schemas, counts, known quirks), then on small files written to
tmp_path for the containers and schemas the samples do not cover."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from tuneline.data.ingest import IngestError, detect_schema, read_source
from tuneline.data.validate import validate_records
from tuneline.params import DataSource, ValidationParams
from tuneline.records import ChatRecord

# Length rules off the way (character counts of real rows run to thousands); everything else default.
ROOMY = ValidationParams(max_tokens=20000, min_accepted=1)

REAL = [
    # file, container, schema, rows read, parse rejections {reason: count}
    ("sft/alpaca.jsonl", "jsonl", "alpaca", 2000, {}),
    ("sft/self_instruct_seed_tasks.jsonl", "jsonl", "self_instruct", 120, {}),
    ("preference/hh_rlhf_harmless.jsonl", "jsonl", "hh_rlhf", 1500, {"prompt_mismatch": 1}),
    ("preference/alpaca_eval_pairwise.json", "json", "alpaca_eval", 500, {"no_preference": 6}),
    ("classification/banking77.csv", "csv", "classification", 3000, {}),
    ("classification/sst2.csv", "csv", "classification", 3000, {}),
    ("drift/code_alpaca.jsonl", "jsonl", "alpaca", 1000, {}),
    ("drift/medical_wikidoc.jsonl", "jsonl", "alpaca", 500, {}),
]


@pytest.fixture(scope="module")
def manifest(shared_data: Path) -> dict[str, dict]:
    return {f["file"]: f for f in json.loads((shared_data / "MANIFEST.json").read_text())["files"]}


@pytest.mark.parametrize("name, container, schema, rows, parse_reasons", REAL, ids=[r[0] for r in REAL])
def test_real_file_reads_with_detected_schema(shared_data, manifest, name, container, schema, rows, parse_reasons):
    result = read_source(shared_data / name)
    assert (result.container, result.schema, result.read) == (container, schema, rows)
    assert result.read == manifest[name]["rows"]
    assert len(result.records) + len(result.rejected) == result.read
    assert dict(Counter(r.reason for r in result.rejected)) == parse_reasons
    assert all(r.source == str(shared_data / name) for r in result.records)
    lines = [r.line for r in result.records]
    assert lines == sorted(lines) and lines[0] >= 1


def _quarantined(shared_data: Path, name: str, params: ValidationParams = ROOMY) -> dict[int, tuple[str, str]]:
    source = read_source(shared_data / name)
    result = validate_records(source.records, params, parse_rejections=source.rejected, read=source.read)
    assert len(result.accepted) + len(result.quarantined) == result.read == source.read
    return {r.line: (r.reason, r.field) for r in result.quarantined}


def test_alpaca_quarantines_exactly_its_two_empty_outputs(shared_data):
    assert _quarantined(shared_data, "sft/alpaca.jsonl") == {923: ("empty_field", "output"), 1109: ("empty_field", "output")}


def test_code_alpaca_quarantines_exactly_its_two_empty_outputs(shared_data):
    assert _quarantined(shared_data, "drift/code_alpaca.jsonl") == {547: ("empty_field", "output"), 758: ("empty_field", "output")}


def test_alpaca_maps_instruction_and_input_to_one_user_turn(shared_data):
    rows = [json.loads(line) for line in (shared_data / "sft/alpaca.jsonl").read_text(encoding="utf-8").splitlines()]
    records = read_source(shared_data / "sft/alpaca.jsonl").records
    assert sum(1 for r in rows if r["input"] == "") == 1264
    for row, record in zip(rows, records):
        user, assistant = record.messages
        assert (user["role"], assistant["role"], assistant["content"]) == ("user", "assistant", row["output"])
        assert user["content"] == (row["instruction"] + "\n\n" + row["input"] if row["input"] else row["instruction"])


def test_hh_rlhf_splits_dialogues_at_the_last_assistant_turn(shared_data):
    result = read_source(shared_data / "preference/hh_rlhf_harmless.jsonl")
    (mismatch,) = result.rejected
    assert (mismatch.line, mismatch.reason) == (187, "prompt_mismatch") and mismatch.raw.startswith('{"chosen"')
    rows = [json.loads(line) for line in (shared_data / "preference/hh_rlhf_harmless.jsonl").read_text().splitlines()]
    for record in result.records:
        row = rows[record.line - 1]
        assert record.kind == "preference" and record.messages[-1]["role"] == "user"
        assert record.messages[0]["content"] == row["chosen"].split("\n\nAssistant:")[0].removeprefix("\n\nHuman:").strip()
        assert row["chosen"].endswith(record.chosen) and row["rejected"].endswith(record.rejected)
        assert 1 <= sum(m["role"] == "user" for m in record.messages) <= 18
    assert set(_quarantined(shared_data, "preference/hh_rlhf_harmless.jsonl").values()) <= {
        ("prompt_mismatch", "rejected"), ("empty_field", "chosen"), ("empty_field", "rejected")}


def test_alpaca_eval_maps_the_pairwise_preference(shared_data):
    rows = json.loads((shared_data / "preference/alpaca_eval_pairwise.json").read_text(encoding="utf-8"))
    result = read_source(shared_data / "preference/alpaca_eval_pairwise.json")
    assert Counter(r["preference"] for r in rows) == {1: 298, 2: 196, 0: 6}
    by_instruction = {r["instruction"]: r for r in rows}
    for record in result.records:
        row = by_instruction[record.messages[0]["content"]]
        winner, loser = ("output_1", "output_2") if row["preference"] == 1 else ("output_2", "output_1")
        assert (record.chosen, record.rejected) == (row[winner], row[loser])
    assert all(r.reason == "no_preference" and r.field == "preference" for r in result.rejected)
    text = (shared_data / "preference/alpaca_eval_pairwise.json").read_text(encoding="utf-8").splitlines()
    for rejection in result.rejected:  # each line points at the opening brace of its element
        assert text[rejection.line - 1].strip() == "{"


def test_self_instruct_flattens_instances(shared_data):
    result = read_source(shared_data / "sft/self_instruct_seed_tasks.jsonl")
    assert len(result.records) == 120 and {r.meta["instance"] for r in result.records} == {0}
    assert sum(r.meta["is_classification"] for r in result.records) == 15
    assert all(r.meta["id"].startswith("seed_task_") for r in result.records)


def test_banking77_keeps_embedded_newlines_and_string_labels(shared_data):
    result = read_source(shared_data / "classification/banking77.csv")
    labels = Counter(r.label for r in result.records)
    assert len(labels) == 77 and "Refund_not_showing_up" in labels and min(labels.values()) >= 7
    assert sum("\n" in r.messages[0]["content"] for r in result.records) == 2
    assert not any("\r" in r.messages[0]["content"] or "\r" in r.label for r in result.records)
    vocabulary = tuple(sorted(labels))
    assert _quarantined(shared_data, "classification/banking77.csv", ValidationParams(labels=vocabulary, min_accepted=1)) == {}


def test_sst2_labels_stay_strings(shared_data):
    result = read_source(shared_data / "classification/sst2.csv")
    assert Counter(r.label for r in result.records) == {"0": 1445, "1": 1555}
    assert _quarantined(shared_data, "classification/sst2.csv", ValidationParams(labels=("0", "1"), min_accepted=1)) == {}


@pytest.mark.parametrize("name", ["pg1342_pride_and_prejudice.txt", "pg2701_moby_dick.txt",
                                  "pg1661_adventures_of_sherlock_holmes.txt"])
def test_gutenberg_corpus_becomes_paragraphs_without_boilerplate(shared_data, manifest, name):
    path = shared_data / "corpus" / name
    lines = path.read_bytes().decode("utf-8-sig").split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF")) + 1
    result = read_source(path)
    assert (result.container, result.schema, result.rejected) == ("txt", "text", [])
    assert result.read == len(result.records) > 1000
    assert manifest[f"corpus/{name}"]["rows"] == len(lines) - (lines[-1] == "")  # the manifest counts lines
    assert start < result.records[0].line and result.records[-1].line < end
    for record in result.records:
        text = record.messages[0]["content"]
        assert record.kind == "text" and text.strip() and "\r" not in text and "\ufeff" not in text
        assert "\n\n" not in text and text.split("\n")[0] == lines[record.line - 1]
        assert "Project Gutenberg" not in text or "License" not in text


# ---------------------------------------------------------------------------
# containers and schemas the samples do not cover, on small files written to tmp_path


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


ALPACA = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


def test_csv_with_bom_crlf_quoted_newlines_and_column_count_errors(tmp_path):
    path = _write(tmp_path / "x.csv", b'\xef\xbb\xbftext,label\r\n"a\r\nb",x\r\nc,y,z\r\nd\r\n\r\ne,f\r\n')
    result = read_source(path)
    assert (result.container, result.schema, result.read) == ("csv", "classification", 4)
    assert [(r.line, r.messages[0]["content"], r.label) for r in result.records] == [(1, "a\r\nb", "x"), (4, "e", "f")]
    assert [(r.line, r.reason, r.field, r.raw) for r in result.rejected] == [
        (2, "extra_columns", None, "c,y,z"), (3, "missing_column", "label", "d")]


def test_tsv_and_explicit_field_mapping(tmp_path):
    path = _write(tmp_path / "x.tsv", "question\tanswer\tcategory\nWhat?\tThat.\tqa\nWhy?\t\tqa\n")
    source = DataSource(path=str(path), fields={"instruction": "question", "output": "answer"})
    result = read_source(source)
    assert (result.container, result.schema) == ("tsv", "alpaca")
    assert result.records[0].messages[1]["content"] == "That." and result.records[0].task == "qa"
    validated = validate_records(result.records, ROOMY)
    assert [(r.line, r.reason, r.field) for r in validated.quarantined] == [(2, "empty_field", "answer")]


def test_json_array_and_wrapper_object_keep_physical_lines(tmp_path):
    rows = [ALPACA, {**ALPACA, "output": None}]
    array = read_source(_write(tmp_path / "a.json", json.dumps(rows, indent=2)))
    wrapped = read_source(_write(tmp_path / "b.json", json.dumps({"version": 1, "data": rows}, indent=2)))
    for result, first_line in ((array, 2), (wrapped, 4)):
        assert (result.container, result.schema, result.read) == ("json", "alpaca", 2)
        assert result.records[0].line == first_line
        assert [(r.line, r.reason, r.field) for r in result.rejected] == [(first_line + 5, "null_field", "output")]


def test_jsonl_bom_blank_lines_and_missing_final_newline(tmp_path):
    path = _write(tmp_path / "x.jsonl", b"\xef\xbb\xbf" + json.dumps(ALPACA).encode() + b"\r\n\r\n   \n" + json.dumps(ALPACA).encode())
    result = read_source(path)
    assert result.read == 2 and [r.line for r in result.records] == [1, 4]


def test_gzip_and_unknown_extension_are_sniffed(tmp_path):
    assert read_source(_write(tmp_path / "x.jsonl.gz", gzip.compress(_jsonl([ALPACA]).encode()))).schema == "alpaca"
    assert read_source(_write(tmp_path / "rows.data", json.dumps([ALPACA]))).container == "json"
    assert read_source(_write(tmp_path / "rows.dat", _jsonl([ALPACA, ALPACA]))).container == "jsonl"
    assert read_source(_write(tmp_path / "lines.json", _jsonl([ALPACA, ALPACA]))).container == "jsonl"
    one = read_source(_write(tmp_path / "one.json", json.dumps(ALPACA, indent=2)))
    assert (one.container, one.read, one.records[0].line) == ("json", 1, 1)


def test_parquet_integer_labels_become_strings(tmp_path):
    import pandas as pd

    path = tmp_path / "x.parquet"
    pd.DataFrame({"sentence": ["good", "bad"], "label": [1, 0]}).to_parquet(path)
    result = read_source(path)
    assert (result.container, result.schema) == ("parquet", "classification")
    assert [(r.line, r.label) for r in result.records] == [(1, "1"), (2, "0")]


USER, BOT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
SCHEMA_CASES = {  # schema: (row, messages, chosen, rejected, task)
    "dolly": ({"instruction": "Sum up.", "context": "Long text.", "response": "Short.", "category": "summarization"},
              [{"role": "user", "content": "Sum up.\n\nLong text."}, {"role": "assistant", "content": "Short."}],
              None, None, "summarization"),
    "messages": ({"messages": [{"role": "system", "content": "Be brief."}, USER, BOT]},
                 [{"role": "system", "content": "Be brief."}, USER, BOT], None, None, None),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
                 [USER, BOT], None, None, None),
    "prompt_completion": ({"prompt": "Hi", "completion": "Hello"}, [USER, BOT], None, None, None),
    "preference": ({"prompt": [USER], "chosen": [BOT], "rejected": "Go away", "task": "chat"},
                   [USER], "Hello", "Go away", "chat"),
    "alpaca_eval": ({"instruction": "Hi", "output_1": "Go away", "output_2": "Hello", "preference": "2"},
                    [USER], "Hello", "Go away", None),
}


@pytest.mark.parametrize("schema", SCHEMA_CASES)
def test_chat_and_preference_schemas(tmp_path, schema):
    row, messages, chosen, rejected, task = SCHEMA_CASES[schema]
    result = read_source(_write(tmp_path / "x.jsonl", _jsonl([row])))
    (record,) = result.records
    assert result.schema == schema
    assert (record.messages, record.chosen, record.rejected, record.task) == (messages, chosen, rejected, task)
    assert record.kind == ("preference" if chosen else "sft")


def test_chat_rows_with_bad_turns_are_rejected_with_the_field(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]},
        {"conversations": [{"from": "human", "value": "Hi"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ["Hello"]}]},
        {"conversations": "Hi"},
    ]
    result = read_source(_write(tmp_path / "x.jsonl", _jsonl(rows)))
    assert [(r.reason, r.field) for r in result.rejected] == [
        ("invalid_messages", "conversations[1].from"), ("invalid_messages", "conversations"),
        ("wrong_type", "conversations[1].value"), ("wrong_type", "conversations")]


def test_self_instruct_counts_each_instance(tmp_path):
    row = {"instruction": "Add.", "instances": [{"input": "1+1", "output": "2"}, {"input": "2+2"}, "x"]}
    result = read_source(_write(tmp_path / "x.jsonl", _jsonl([row, {"instruction": "None.", "instances": []}])))
    assert result.read == 4 and len(result.records) == 1
    assert [(r.line, r.reason, r.field) for r in result.rejected] == [
        (1, "missing_field", "instances[1].output"), (1, "wrong_type", "instances[2]"), (2, "empty_field", "instances")]


def test_explicit_schema_and_task_win_over_detection(tmp_path):
    path = _write(tmp_path / "x.jsonl", _jsonl([{"prompt": "p", "completion": "c", "text": "t", "task": "row"}]))
    assert read_source(path).schema == "prompt_completion" and read_source(path).records[0].task == "row"
    result = read_source(DataSource(path=str(path), schema="text", task="tagged"))
    assert (result.schema, result.records[0].kind, result.records[0].task) == ("text", "text", "tagged")


def test_detect_schema_votes_over_rows():
    rows = [{"chosen": "a", "rejected": "b"}] * 3 + [{"instruction": "i", "output": "o"}] * 2 + [{}, {"x": 1}]
    assert detect_schema(rows) == "hh_rlhf"
    with pytest.raises(IngestError, match="cannot recognize the schema"):
        detect_schema([{"x": 1}])


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", b""), ("blank.jsonl", b"\xef\xbb\xbf \n\r\n"), ("header_only.csv", b"text,label\r\n"),
    ("unknown.jsonl", b'{"foo": 1}\n{"bar": 2}\n'), ("garbage.jsonl", b"not json\n"), ("broken.json", b'[{"a": 1},'),
    ("empty_array.json", b"[]"),
])
def test_unusable_files_raise_one_line_errors_naming_the_file(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    with pytest.raises(IngestError) as caught:
        read_source(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_missing_file_and_directory_raise(tmp_path):
    for path in (tmp_path / "nope.jsonl", tmp_path):
        with pytest.raises(IngestError, match=str(path)):
            read_source(path)


def test_plain_text_strips_bom_and_gutenberg_markers(tmp_path):
    text = ("\ufeffHeader\r\n*** START OF THE BOOK ***\r\n\r\nFirst para\r\nline two\r\n\r\n\r\nSecond\r\n"
            "\r\nEnd of the Project Gutenberg EBook\r\n*** END OF THE BOOK ***\r\nLicence\r\n")
    result = read_source(_write(tmp_path / "book.txt", text))
    assert [(r.line, r.messages[0]["content"]) for r in result.records] == [(4, "First para\nline two"), (8, "Second")]
    plain = read_source(_write(tmp_path / "plain.txt", "one\n\ntwo\nthree\n"))
    assert [(r.line, r.messages[0]["content"]) for r in plain.records] == [(1, "one"), (3, "two\nthree")]


def test_raw_text_of_bad_rows_is_safe_to_store(tmp_path):
    long_line = json.dumps({**ALPACA, "output": "x" * 5000, "input": 3}).encode()
    path = _write(tmp_path / "x.jsonl", b'{"instruction": "caf\xe9"}\n{"instruction": "\\ud83d", "output": "o"}\n' + long_line + b"\n")
    rejected = read_source(path).rejected
    assert [(r.reason, r.field) for r in rejected] == [("invalid_utf8", None), ("invalid_unicode", "instruction"), ("wrong_type", "input")]
    for rejection in rejected:
        rejection.raw.encode("utf-8")  # never raises
        assert len(rejection.raw) <= 501
    assert "caf\\xe9" in rejected[0].raw and "\\ud83d" in rejected[1].raw


def test_records_are_canonical_chat_records(tmp_path):
    record = read_source(_write(tmp_path / "x.jsonl", _jsonl([ALPACA]))).records[0]
    assert isinstance(record, ChatRecord) and ChatRecord.from_dict(record.to_dict()) == record


def test_deeply_nested_lines_and_nested_surrogates_are_rejected_not_raised(tmp_path):
    nested = {"instruction": "a", "output": "b", "input": {"x": ["\ud83d"]}}
    path = _write(tmp_path / "x.jsonl", "[" * 100_000 + "]" * 100_000 + "\n" + _jsonl([nested, ALPACA]))
    result = read_source(path)
    assert [(r.line, r.reason, r.field) for r in result.rejected] == [
        (1, "malformed_json", None), (2, "invalid_unicode", "input.x[0]")]
    assert [r.line for r in result.records] == [3]
