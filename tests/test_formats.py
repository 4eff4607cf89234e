"""The dataset-file validator: formats, error codes with lines and fields, streaming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_core.formats import (
    DatasetValidator,
    LineError,
    ValidationReport,
    _checked_messages,
    _plain_chat,
    _Row,
    _scan_whole,
    classify_row,
    validate_bytes,
)

REPO = Path(__file__).resolve().parents[1]

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "Paris."}
CHAT = {"messages": [SYSTEM, USER, ASSISTANT]}
PREFERENCE = {
    "input": {"messages": [USER]},
    "preferred_output": [ASSISTANT],
    "non_preferred_output": [{"role": "assistant", "content": "Lyon."}],
}


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def feed_in_chunks(data: bytes, size: int, **kw: int) -> ValidationReport:
    validator = DatasetValidator(**kw)
    for i in range(0, len(data), size):
        validator.feed(data[i : i + size])
    return validator.finish()


VALID_ROWS = [
    ("chat", CHAT),
    (
        "chat",  # function calling: tools, a tool call with null content, the tool's answer
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "capital", "arguments": '{"country": "FR"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "Paris"},
                ASSISTANT,
            ],
            "tools": [{"type": "function", "function": {"name": "capital", "parameters": {}}}],
            "parallel_tool_calls": False,
        },
    ),
    (
        "chat",  # content parts, developer role, weights
        {
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                USER,
                {"role": "assistant", "content": "Lyon.", "weight": 0},
                {"role": "user", "content": "Wrong."},
                {"role": "assistant", "content": [{"type": "text", "text": "Paris."}], "weight": 1},
            ]
        },
    ),
    ("prompt_only", {"messages": [SYSTEM, USER], "answer": "Paris"}),
    ("prompt_only", {"prompt": "2 + 2 =", "answer": 4}),
    ("prompt_only", {"prompt": [USER]}),
    ("prompt_completion", {"prompt": "The capital of France is", "completion": " Paris."}),
    ("prompt_completion", {"prompt": [USER], "completion": [ASSISTANT]}),
    ("text", {"text": "Paris is the capital and largest city of France."}),
    ("preference", PREFERENCE),
    ("preference", {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}),
    (
        "preference",
        {"chosen": [USER, ASSISTANT], "rejected": [USER, {**ASSISTANT, "content": "?"}]},
    ),
    ("preference", {**PREFERENCE, "margin": 0.5}),
    ("kto", {"prompt": "Capital of France?", "completion": "Lyon.", "label": False}),
]


@pytest.mark.parametrize(("fmt", "row"), VALID_ROWS)
def test_every_format_accepted(fmt: str, row: dict[str, object]) -> None:
    assert classify_row(row) == (fmt, [])
    report = validate_bytes(jsonl(row, row))
    assert (report.format, report.num_examples, report.errors, report.ok) == (fmt, 2, [], True)
    assert report.status_details() is None


GOOD = jsonl(CHAT)
BAD_LINES = [
    # (line 2 of a file whose line 1 is a good chat row, expected field, expected code)
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "not_an_object"),
    (b'{"text": "caf\xe9"}', None, "not_utf8"),
    (jsonl({"hello": "world"}), None, "missing_field"),
    (jsonl({"messages": [USER, {"content": "Paris."}]}), "messages[1].role", "missing_field"),
    (jsonl({"messages": [USER, {"role": "bot", "content": "x"}]}), "messages[1].role", "unknown_role"),
    (jsonl({"messages": [{"role": "user", "content": " "}, ASSISTANT]}), "messages[0].content", "empty_content"),
    (jsonl({"messages": [USER, {"role": "assistant", "content": ""}]}), "messages[1].content", "empty_content"),
    (jsonl({"messages": [USER, {"role": "assistant", "content": 3}]}), "messages[1].content", "invalid_type"),
    (jsonl({"messages": [USER, {**ASSISTANT, "weight": 2}]}), "messages[1].weight", "invalid_value"),
    (jsonl({"messages": [SYSTEM, USER]}), "messages", "no_assistant_turn"),
    (jsonl({"messages": [USER, {**ASSISTANT, "weight": 0}]}), "messages", "no_assistant_turn"),
    (jsonl({"messages": "hi"}), "messages", "invalid_type"),
    (jsonl({"text": ""}), "text", "empty_content"),
    (jsonl({"prompt": "a", "completion": "b", "label": "yes"}), "label", "invalid_label"),
    (jsonl({**PREFERENCE, "preferred_output": [USER]}), "preferred_output[0].role", "invalid_value"),
    (jsonl({"input": PREFERENCE["input"], "preferred_output": [ASSISTANT]}), "non_preferred_output", "missing_field"),
    (jsonl({"prompt": "x", "chosen": "a", "rejected": {}}), "rejected", "invalid_type"),
    (jsonl({**PREFERENCE, "margin": "big"}), "margin", "invalid_type"),
    (jsonl(PREFERENCE), None, "format_mismatch"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "field", "code"), BAD_LINES)
def test_each_error_code_has_line_and_field(line: bytes, field: str | None, code: str) -> None:
    report = validate_bytes(GOOD + line.rstrip(b"\n") + b"\n" + GOOD)
    assert [(e.line, e.field, e.code) for e in report.errors] == [(2, field, code)]
    assert (report.format, report.num_examples, report.error_count) == ("chat", 2, 1)
    assert not report.ok
    where = f"{field}: " if field else ""
    assert report.status_details() == f"1 error. line 2: {where}{report.errors[0].message}"


def test_exact_messages_for_common_errors() -> None:
    data = GOOD + b"?\n" + jsonl({"messages": [USER, {"role": "bot", "content": "x"}]})
    data += b'{"text": "caf\xe9 au lait"}\n' + jsonl({"messages": [USER]})
    report = validate_bytes(data)
    assert report.status_details() == (
        "4 errors. line 2: not valid JSON (Expecting value at column 1); "
        "line 3: messages[1].role: unknown role 'bot' "
        "(expected system, user, assistant, tool or developer); "
        "line 4: not valid UTF-8 (byte 0xe9 at offset 14); "
        "line 5: messages: no assistant turn to learn from"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"a": 1', "not valid JSON (Expecting ',' delimiter at column 8)"),
        (b"[" * 100_000, "not valid JSON (nested too deeply)"),
        (b'{"n": ' + b"9" * 5000 + b"}", "not valid JSON (Exceeds the limit"),
    ],
)
def test_hostile_json_is_an_error_not_a_crash(line: bytes, message: str) -> None:
    report = validate_bytes(GOOD + line + b"\n" + GOOD)
    assert [(e.line, e.code) for e in report.errors] == [(2, "invalid_json")]
    assert report.errors[0].message.startswith(message)


@pytest.mark.parametrize(
    "line",
    [
        b' {"text": "space before"}',
        b'{"text": "space after"}  ',
        b'{"text": "a"} {"text": "b"}',
        b'{"text": "a"}x',
        b"nul",
        b'"just a string"',
        b'{"text": "\\ud800 lone surrogate"}',
        b'{"text": "nan", "n": NaN, "i": -Infinity}',
        b"[" * 5000,
        b'{"n": ' + b"9" * 5000 + b"}",
        b'{"t": "tab\there"}',
    ],
)
def test_the_validator_parses_each_line_as_json_loads_does(line: bytes) -> None:
    # The scanner is called directly (formats._scan_whole): what it reads whole is what
    # json.loads returns, and whatever it does not, json.loads decides. So a line is refused,
    # or read, exactly as json.loads would.
    text = line.decode()
    try:
        expected: tuple[str, object] = ("ok", json.loads(text))
    except (ValueError, RecursionError) as error:
        expected = ("error", type(error).__name__)
    scanned, end = _scan_whole(text)
    if end == len(text):
        assert expected == ("ok", scanned), line
    report = validate_bytes(GOOD + line + b"\n")
    refused = [(e.line, e.code) for e in report.errors if e.code == "invalid_json"]
    assert refused == ([(2, "invalid_json")] if expected[0] == "error" else []), line


def test_line_too_long_and_empty_file() -> None:
    short = jsonl({"text": "hi"})
    report = validate_bytes(short + b'{"text": "' + b"x" * 99 + b'"}\n' + short, max_line_bytes=64)
    assert [(e.line, e.code) for e in report.errors] == [(2, "line_too_long")]
    assert report.num_examples == 2
    for empty in (b"", b"\n", b"\n  \r\n"):
        report = validate_bytes(empty)
        assert report.errors == [LineError(1, None, "empty_file", "the file has no examples")]
        assert (report.format, report.error_count, report.ok) == (None, 1, False)


def test_majority_rule_and_mismatch_messages() -> None:
    data = jsonl(PREFERENCE, CHAT, CHAT, {"messages": [USER]}, CHAT)
    report = validate_bytes(data)
    assert (report.format, report.num_examples, report.error_count) == ("chat", 3, 2)
    assert report.errors == [
        LineError(
            1,
            None,
            "format_mismatch",
            "row is in the preference format but the file is in the chat format "
            "(as 3 of 5 valid rows)",
        ),
        LineError(4, "messages", "no_assistant_turn", "no assistant turn to learn from"),
    ]
    # A prompt-only file (GRPO) reports a conversation that ends on the assistant as a mismatch,
    # not as "no assistant turn".
    report = validate_bytes(jsonl({"messages": [USER]}, {"prompt": "hi"}, CHAT))
    assert report.format == "prompt_only"
    assert [(e.line, e.code) for e in report.errors] == [(3, "format_mismatch")]
    assert "row is in the chat format but the file is in the prompt_only format" in (
        report.errors[0].message
    )


def test_ties_go_to_the_first_valid_row() -> None:
    text = {"text": "hello"}
    assert validate_bytes(b"oops\n" + jsonl(text, CHAT, CHAT, text)).format == "text"
    assert validate_bytes(jsonl(CHAT, text, text, CHAT)).format == "chat"


def test_multi_turn_prompts_fit_a_prompt_only_file() -> None:
    multi_turn = {"messages": [USER, ASSISTANT, {"role": "user", "content": "Spain?"}], "a": "x"}
    report = validate_bytes(jsonl(multi_turn, {"messages": [USER]}, {"prompt": "hi"}))
    assert (report.format, report.num_examples, report.ok) == ("prompt_only", 3, True)
    # ...and still count as conversations in a chat file, which is what they are on their own.
    report = validate_bytes(jsonl(multi_turn, CHAT))
    assert (report.format, report.num_examples, report.ok) == ("chat", 2, True)
    assert validate_bytes(jsonl(multi_turn, multi_turn)).format == "chat"


def test_bom_crlf_blank_lines_and_missing_final_newline() -> None:
    data = b"\xef\xbb\xbf" + GOOD.replace(b"\n", b"\r\n") + b"\n   \n" + GOOD.rstrip(b"\n")
    report = validate_bytes(data)
    assert (report.format, report.num_examples, report.errors) == ("chat", 2, [])
    assert report.warnings == ["skipped 2 blank lines (lines 2, 3)"]
    assert report.ok


def test_chunking_does_not_change_the_report() -> None:
    data = (
        b"\xef\xbb\xbf"
        + GOOD
        + b"\n"
        + jsonl({"text": "caf\u00e9 \u2603 \U0001f600"}, PREFERENCE)
        + b'{"text": "\xff"}\r\n'
        + b"{broken\n"
        + b'{"text": "' + b"y" * 300 + b'"}\n'
        + jsonl(CHAT, {"messages": [USER]}) * 3
        + GOOD.rstrip(b"\n")
    )  # fmt: skip
    reports = [feed_in_chunks(data, size, max_line_bytes=256) for size in (1, 7, len(data))]
    assert reports[0] == reports[1] == reports[2]
    codes = [e.code for e in reports[0].errors]
    assert (
        codes
        == ["format_mismatch"] * 2
        + ["not_utf8", "invalid_json", "line_too_long"]
        + ["no_assistant_turn"] * 3
    )
    assert reports[0].num_examples == 5


def test_cap_keeps_the_first_errors_in_line_order() -> None:
    # Direct errors (bad JSON) and mismatches (found only at finish) interleave.
    data = jsonl(CHAT) * 40 + (b"nope\n" + jsonl({"text": "t"})) * 30
    report = validate_bytes(data, max_errors=5)
    assert report.error_count == 60 and report.num_examples == 40
    assert [(e.line, e.code) for e in report.errors] == [
        (41, "invalid_json"),
        (42, "format_mismatch"),
        (43, "invalid_json"),
        (44, "format_mismatch"),
        (45, "invalid_json"),
    ]
    details = report.status_details()
    assert details is not None
    assert details.startswith("60 errors. line 41: not valid JSON")
    assert details.endswith("; and 55 more")


def test_status_details_stays_short() -> None:
    long_role = "r" * 5000
    data = GOOD + jsonl({"messages": [USER, {"role": long_role, "content": "x"}]}) * 100
    details = validate_bytes(data, max_errors=100).status_details()
    assert details is not None
    assert len(details) < 2000
    assert details.startswith("100 errors. line 2: messages[1].role: unknown role 'rrr")
    assert details.endswith("more")


def test_to_dict_is_json() -> None:
    report = validate_bytes(GOOD + b"{bad\n")
    assert json.loads(json.dumps(report.to_dict())) == {
        "format": "chat",
        "num_examples": 1,
        "error_count": 1,
        "errors": [
            {
                "line": 2,
                "field": None,
                "code": "invalid_json",
                "message": "not valid JSON (Expecting property name enclosed in double quotes "
                "at column 2)",
            }
        ],
        "warnings": [],
    }


def test_long_line_is_skipped_without_buffering_it() -> None:
    validator = DatasetValidator(max_line_bytes=1024 * 1024)
    validator.feed(GOOD)
    validator.feed(b'{"text": "')
    block = b"z" * (64 * 1024)
    peak = 0
    for _ in range(40 * 16):  # a 40 MiB line
        validator.feed(block)
        peak = max(peak, validator.buffered_bytes)
    validator.feed(b'"}\n' + GOOD)
    report = validator.finish()
    assert peak <= 2 * 1024 * 1024
    assert [(e.line, e.code) for e in report.errors] == [(2, "line_too_long")]
    assert report.num_examples == 2
    # One huge chunk holding the long line and more: also nothing of it buffered.
    validator = DatasetValidator(max_line_bytes=1024 * 1024)
    validator.feed(b"x" * (40 * 1024 * 1024))
    assert validator.buffered_bytes == 0
    validator.feed(b"x\n" + GOOD)
    assert [(e.line, e.code) for e in validator.finish().errors] == [(1, "line_too_long")]


def test_a_line_at_the_limit_is_fine() -> None:
    line = json.dumps({"text": "w" * 50}).encode()
    assert validate_bytes(line + b"\n", max_line_bytes=len(line)).ok
    assert not validate_bytes(line + b"\n", max_line_bytes=len(line) - 1).ok


def test_imports_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import trainer_core.formats; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names) - {'trainer_core'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_plain_chat_fast_path_agrees_with_the_full_checks() -> None:
    # Every small conversation over these roles, contents and extra keys: where the fast
    # path gives a shape, the full checks give the same one and find no problem; and it
    # gives one for the plain rows, so that it is used at all.
    roles = ["system", "user", "assistant", "tool", "developer", "bogus", None]
    contents: list[object] = ["hi", "  ", "", None, 5, [{"type": "text", "text": "a"}]]
    extras: list[dict[str, object]] = [{}, {"weight": 0}, {"weight": 1}, {"name": "x"}]
    messages = [
        {**({"role": role} if role else {}), "content": content, **extra}
        for role in roles
        for content in contents
        for extra in extras
    ]
    messages += ["not a message", {"role": "assistant", "tool_calls": [{"id": "1"}]}]
    conversations: list[object] = [[], "text", *([m] for m in messages)]
    plain = [m for m in messages if isinstance(m, dict) and set(m) == {"role", "content"}]
    conversations += [[a, b] for a in plain for b in plain]
    accepted = 0
    for conversation in conversations:
        shape = _plain_chat(conversation)
        if shape is None:
            continue
        accepted += 1
        row = _Row()
        assert _checked_messages(row, {"messages": conversation}) == shape, conversation
        assert row.problems == [], conversation
    assert accepted >= 16  # the plain rows: four roles with text, alone and in pairs
    assert _plain_chat([USER, ASSISTANT]) == ("chat", (), False)
    assert _plain_chat([SYSTEM, USER]) == ("prompt_only", (), True)
    assert _plain_chat([USER, ASSISTANT, USER]) == ("chat", ("prompt_only",), False)
