"""Validate a JSONL dataset file while it streams in, and point at the bad lines.

The API runs this during an upload, so it imports only the standard library (no torch) and
holds at most one line in memory: a line longer than ``max_line_bytes`` is reported and its
remainder discarded as it arrives. Everything kept about the rows is capped (counts plus the
first few line numbers), so a file of millions of rows validates in constant memory.

A file's format is the one that most valid rows fit (ties go to the first valid row's format);
valid rows of any other format are reported at ``finish()``, when the vote is known.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple, cast, get_args

Format = Literal["chat", "prompt_completion", "text", "preference", "kto", "prompt_only"]
Problem = tuple[str | None, str, str]  # (field, code, message)

ROLES = ("system", "user", "assistant", "tool", "developer")
_ROLE_LIST = "system, user, assistant, tool or developer"
_BOM = b"\xef\xbb\xbf"
_MAX_DETAILS_CHARS = 1800  # status_details must stay under 2000 (OpenAI's field is short)
_MAX_MESSAGE_CHARS = 200
_UNRECOGNISED = (
    "no known keys (expected messages, prompt, text, "
    "input/preferred_output/non_preferred_output or chosen/rejected)"
)


@dataclass(frozen=True)
class LineError:
    line: int  # 1-based line number in the file
    field: str | None  # e.g. "messages[2].role"; None for the whole line
    code: str  # machine code, e.g. "invalid_json"
    message: str  # human sentence


@dataclass
class ValidationReport:
    format: Format | None
    num_examples: int
    errors: list[LineError]
    error_count: int
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.num_examples > 0

    def status_details(self) -> str | None:
        """One human string naming the first bad lines, short enough for a job's status."""
        if self.ok:
            return None
        if not self.errors:
            return "the file has no examples"
        noun = "error" if self.error_count == 1 else "errors"
        head = f"{self.error_count} {noun}. "
        parts: list[str] = []
        used = len(head)
        for err in self.errors:
            text = f"{err.field}: {err.message}" if err.field else err.message
            if len(text) > _MAX_MESSAGE_CHARS:  # a JSON error can quote a huge line
                text = text[: _MAX_MESSAGE_CHARS - 1] + "…"
            part = f"line {err.line}: {text}"
            used += len(part) + 2
            if used > _MAX_DETAILS_CHARS:
                break
            parts.append(part)
        if self.error_count > len(parts):
            parts.append(f"and {self.error_count - len(parts)} more")
        return head + "; ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return {
            "format": self.format,
            "num_examples": self.num_examples,
            "error_count": self.error_count,
            "errors": [asdict(e) for e in self.errors],
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------- one row


class _Row:
    """Collects one row's problems, each tagged with the field it is about."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, where: str | None, code: str, message: str) -> None:
        self.problems.append((where, code, message))


def _is_blank(value: object) -> bool:
    return isinstance(value, str) and not value.strip()


def _content(row: _Row, msg: dict[str, object], where: str) -> bool:
    """Check a message's content; return whether it holds any text."""
    content = msg.get("content")
    if isinstance(content, str):
        return bool(content.strip())
    if not isinstance(content, list):
        row.add(where, "invalid_type", "content must be a string or a list of text parts")
        return False
    text = False
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text"):
            row.add(
                f"{where}[{j}]", "invalid_type", 'expected a {"type": "text", "text": ...} part'
            )
        elif not isinstance(part.get("text"), str):
            row.add(f"{where}[{j}].text", "invalid_type", "text must be a string")
        else:
            text = text or bool(part["text"].strip())
    return text


def _message(row: _Row, msg: object, where: str) -> tuple[str, bool] | None:
    """Check one message; return (role, whether it is a turn to learn from), or None if bad."""
    if not isinstance(msg, dict):
        row.add(where, "invalid_type", "a message must be a JSON object")
        return None
    before = len(row.problems)
    role = msg.get("role")
    if role is None:
        row.add(f"{where}.role", "missing_field", "the message has no role")
    elif role not in ROLES:
        row.add(f"{where}.role", "unknown_role", f"unknown role {role!r} (expected {_ROLE_LIST})")
    tool_calls = msg.get("tool_calls")
    if tool_calls is not None and (role != "assistant" or not isinstance(tool_calls, list)):
        row.add(f"{where}.tool_calls", "invalid_type", "tool_calls must be a list on an assistant")
    weight = msg.get("weight")
    if weight is not None and (
        role != "assistant" or isinstance(weight, bool) or weight not in (0, 1)
    ):
        row.add(f"{where}.weight", "invalid_value", "weight must be 0 or 1, on assistant messages")
    # An assistant that only calls tools may leave content out; every other message needs it.
    if "content" not in msg or msg["content"] is None:
        if not (role == "assistant" and tool_calls):
            row.add(f"{where}.content", "missing_field", "the message has no content")
        has_text = False
    else:
        has_text = _content(row, msg, f"{where}.content")
        # A tool may legitimately return nothing; anyone else saying nothing is a data bug.
        says_nothing = not has_text and len(row.problems) == before
        if says_nothing and role != "tool" and not (role == "assistant" and tool_calls):
            row.add(f"{where}.content", "empty_content", f"the {role} message is empty")
    if len(row.problems) > before:
        return None
    learnable = role == "assistant" and (has_text or bool(tool_calls)) and weight != 0
    return str(role), learnable  # a str already (ROLES): no copy


def _messages(row: _Row, value: object, where: str) -> list[tuple[str, bool]] | None:
    """Check a message list; return its (role, learnable) pairs, or None if anything is bad."""
    if not isinstance(value, list):
        row.add(where, "invalid_type", "expected a list of messages")
        return None
    if not value:
        row.add(where, "empty_content", "the message list is empty")
        return None
    checked: list[tuple[str, bool]] = []
    broken = False
    for i, message in enumerate(value):  # every message, so that every problem is reported
        turn = _message(row, message, f"{where}[{i}]")
        if turn is None:
            broken = True
        else:
            checked.append(turn)
    return None if broken else checked


def _text_or_messages(row: _Row, obj: dict[str, object], key: str, required: bool = True) -> None:
    if key not in obj:
        if required:
            row.add(key, "missing_field", f"the row has no {key!r}")
    elif isinstance(obj[key], str):
        if _is_blank(obj[key]):
            row.add(key, "empty_content", f"{key!r} is empty")
    elif isinstance(obj[key], list):
        _messages(row, obj[key], key)
    else:
        row.add(key, "invalid_type", f"{key!r} must be a string or a list of messages")


class _Shape(NamedTuple):
    """What a valid row is: its format, and any other format it also fits.

    A tuple, not a dataclass: every valid row's shape is a key of the validator's tallies,
    and a tuple hashes and compares in C (the dataclass's Python ``__eq__`` and ``__init__``
    were a quarter of the time of a 600-byte chat row)."""

    format: Format
    also: tuple[Format, ...] = ()
    from_messages: bool = False  # a messages row with no assistant turn ("no_assistant_turn")

    def fits(self, fmt: Format) -> bool:
        return fmt == self.format or fmt in self.also


_CHAT = _Shape("chat")
_CHAT_OR_PROMPT = _Shape("chat", ("prompt_only",))
_PROMPT_FROM_MESSAGES = _Shape("prompt_only", from_messages=True)
# Roles whose message is complete with a role and non-blank text (a tool's may be empty).
_PLAIN_ROLES = frozenset({"system", "user", "assistant", "developer"})


def _plain_chat(messages: object) -> _Shape | None:
    """The shape of the commonest row, ``{"messages": [{"role": ..., "content": "..."}, ...]}``
    with nothing else in its messages, in one pass; None for any other row, which the full
    checks below then classify. For a row it accepts it gives what those checks give, with no
    problem (tests/test_formats.py holds the two to each other): it only saves their time, a
    third of a 600-byte row's validation."""
    if type(messages) is not list or not messages:
        return None
    learnable = False
    for message in messages:
        if type(message) is not dict or len(message) != 2:
            return None
        role = message.get("role")
        content = message.get("content")
        if role not in _PLAIN_ROLES or type(content) is not str or not content.strip():
            return None
        learnable = learnable or role == "assistant"
    if not learnable:
        return _PROMPT_FROM_MESSAGES
    return _CHAT if messages[-1]["role"] == "assistant" else _CHAT_OR_PROMPT


def _classify_messages(row: _Row, obj: dict[str, object]) -> _Shape:
    if len(obj) == 1 and (plain := _plain_chat(obj["messages"])) is not None:
        return plain
    return _checked_messages(row, obj)


def _checked_messages(row: _Row, obj: dict[str, object]) -> _Shape:
    for key, kind in (("tools", list), ("parallel_tool_calls", bool)):
        if key in obj and not isinstance(obj[key], kind):
            row.add(key, "invalid_type", f"{key!r} must be a {kind.__name__}")
    turns = _messages(row, obj["messages"], "messages")
    if turns is None:  # broken: report it as the chat row it most likely meant to be
        return _CHAT
    if not any(learnable for _, learnable in turns):
        return _PROMPT_FROM_MESSAGES
    # A multi-turn conversation that ends on the user is also a fine RL/GRPO prompt.
    return _CHAT_OR_PROMPT if turns[-1][0] != "assistant" else _CHAT


def _classify_openai_preference(row: _Row, obj: dict[str, object]) -> None:
    prompt = obj.get("input")
    if not isinstance(prompt, dict):
        code = "missing_field" if prompt is None else "invalid_type"
        row.add("input", code, 'expected "input": {"messages": [...]}')
    else:
        _messages(row, prompt.get("messages"), "input.messages")
    for key in ("preferred_output", "non_preferred_output"):
        if key not in obj:
            row.add(key, "missing_field", f"the row has no {key!r}")
            continue
        turns = _messages(row, obj[key], key) or []
        for i, (role, _) in enumerate(turns):
            if role not in ("assistant", "tool"):
                row.add(f"{key}[{i}].role", "invalid_value", f"{role!r} (expected assistant)")


def _classify(obj: object) -> tuple[_Shape | None, list[Problem]]:
    """Find the row's format from its keys, then check it. Extra keys are allowed everywhere
    (reinforcement graders read them), so keys only choose the format and never fail it."""
    if not isinstance(obj, dict):
        return None, [(None, "not_an_object", "each line must be a JSON object")]
    row = _Row()
    shape: _Shape
    if "messages" in obj:  # first: RL rows may carry any grader key, even "label" or "chosen"
        shape = _classify_messages(row, obj)
    elif {"input", "preferred_output", "non_preferred_output"} & obj.keys():
        shape = _Shape("preference")
        _classify_openai_preference(row, obj)
    elif {"chosen", "rejected"} & obj.keys():
        shape = _Shape("preference")
        for key in ("prompt", "chosen", "rejected"):  # no prompt: it is implicit in both
            _text_or_messages(row, obj, key, required=key != "prompt")
    elif "completion" in obj:
        shape = _Shape("kto" if "label" in obj else "prompt_completion")
        _text_or_messages(row, obj, "prompt")
        _text_or_messages(row, obj, "completion")
        if "label" in obj and not isinstance(obj["label"], bool):
            row.add("label", "invalid_label", "label must be true or false")
    elif "prompt" in obj:
        shape = _Shape("prompt_only")
        _text_or_messages(row, obj, "prompt")
    elif "text" in obj:
        shape = _Shape("text")
        if not isinstance(obj["text"], str):
            row.add("text", "invalid_type", "'text' must be a string")
        elif _is_blank(obj["text"]):
            row.add("text", "empty_content", "'text' is empty")
    else:
        return None, [(None, "missing_field", _UNRECOGNISED)]
    margin = obj.get("margin", 0)
    if shape.format == "preference" and (
        isinstance(margin, bool) or not isinstance(margin, int | float)
    ):
        row.add("margin", "invalid_type", "margin must be a number")
    return shape, row.problems


def classify_row(obj: object) -> tuple[Format | None, list[Problem]]:
    """One parsed JSON row → the format its keys select, and its problems (field, code, message).

    The row is a valid example of that format exactly when the problem list is empty.
    """
    shape, problems = _classify(obj)
    return (shape.format if shape else None), problems


# ---------------------------------------------------------------- the file


@dataclass
class _Tally:
    """Valid rows of one shape: how many, and the first few line numbers."""

    first: int
    count: int = 0
    lines: list[int] = field(default_factory=list)


# json's own C scanner, as json.loads calls it (same decoder settings). Called directly it
# skips loads() and decode()'s Python layers around it: 2.8 -> 1.4-1.75 us for a 600-byte chat
# row, a sixth of an upload's CPU (docs/benchmarks.md, "API under load").
_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set in __init__


def _scan_whole(text: str) -> tuple[object, int]:
    """``text`` parsed by the scanner json.loads uses, and where the value ended: the object
    json.loads would return when it ends exactly at ``len(text)`` (no whitespace around it,
    nothing after it). Otherwise (-1 on any error) json.loads decides and words the error."""
    try:
        return _scan_once(text, 0)
    except (StopIteration, ValueError, RecursionError):
        return None, -1


class DatasetValidator:
    """Feed a JSONL file in chunks of any size, then call ``finish()`` for the report."""

    def __init__(self, *, max_errors: int = 20, max_line_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_errors = max_errors
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()  # the current line, so far
        self._skipping = False  # the current line was too long: drop bytes until its newline
        self._line = 1  # number of the line being read
        self._errors: list[LineError] = []
        self._error_count = 0
        self._blank: list[int] = []
        self._blank_count = 0
        self._rows = 0  # non-blank lines, valid or not
        self._tallies: dict[_Shape, _Tally] = {}
        self._report: ValidationReport | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the line being read (never more than max_line_bytes)."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> None:
        if self._report is not None:
            raise RuntimeError("feed() after finish()")
        view, start = memoryview(chunk), 0
        while start < len(view):
            newline = chunk.find(b"\n", start)
            end = len(view) if newline < 0 else newline
            if newline >= 0 and not self._buf and not self._skipping:
                # A whole line inside the chunk (nearly every line): checked where it lies,
                # not copied into the line buffer first.
                if end - start > self.max_line_bytes:
                    self._too_long()
                    self._skipping = False
                else:
                    self._check_line(chunk[start:end])
                self._line += 1
                start = newline + 1
                continue
            if not self._skipping:
                if len(self._buf) + end - start > self.max_line_bytes:
                    self._too_long()
                else:
                    self._buf += view[start:end]
            if newline < 0:
                return
            self._end_line()
            start = newline + 1

    def finish(self) -> ValidationReport:
        if self._report is None:
            if self._buf or self._skipping:  # the last line had no newline
                self._end_line()
            self._report = self._build_report()
        return self._report

    # -- lines

    def _too_long(self) -> None:
        self._buf.clear()
        self._skipping = True
        self._rows += 1
        limit = f"{self.max_line_bytes:,} bytes"
        self._error(self._line, None, "line_too_long", f"the line is longer than {limit}")

    def _end_line(self) -> None:
        if not self._skipping:
            self._check_line(bytes(self._buf))
        self._buf.clear()
        self._skipping = False
        self._line += 1

    def _check_line(self, buf: bytes) -> None:
        if buf.endswith(b"\r"):  # files written on Windows
            buf = buf[:-1]
        if self._line == 1 and buf.startswith(_BOM):
            buf = buf[3:]
        if not buf.strip():
            self._blank_count += 1
            if len(self._blank) < self.max_errors:
                self._blank.append(self._line)
            return
        self._rows += 1
        try:
            text = buf.decode("utf-8")
        except UnicodeDecodeError as e:
            byte = f"byte 0x{buf[e.start]:02x} at offset {e.start + 1}"
            self._error(self._line, None, "not_utf8", f"not valid UTF-8 ({byte})")
            return
        obj, end = _scan_whole(text)
        if end == len(text):
            self._check_row(obj)
            return
        try:
            obj = json.loads(text)
        except ValueError as e:  # JSONDecodeError, or an integer of over 4300 digits
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else e
            self._error(self._line, None, "invalid_json", f"not valid JSON ({why})")
            return
        except RecursionError:  # "[[[[..." deeper than the parser's stack
            self._error(self._line, None, "invalid_json", "not valid JSON (nested too deeply)")
            return
        self._check_row(obj)

    def _check_row(self, obj: object) -> None:
        shape, problems = _classify(obj)
        for where, code, message in problems:
            self._error(self._line, where, code, message)
        if shape is not None and not problems:
            tally = self._tallies.setdefault(shape, _Tally(first=self._line))
            tally.count += 1
            if len(tally.lines) < self.max_errors:
                tally.lines.append(self._line)

    def _error(self, line: int, where: str | None, code: str, message: str) -> None:
        # Lines arrive in order, so the first max_errors kept are the first in the file.
        self._error_count += 1
        if len(self._errors) < self.max_errors:
            self._errors.append(LineError(line, where, code, message))

    # -- the report

    def _vote(self) -> Format | None:
        """The format most valid rows fit. On a tie, the one seen first: the first valid row's
        own format, before another that row also fits (a multi-turn prompt)."""

        def rank(fmt: Format) -> tuple[int, int, int]:
            fits = [(s, t) for s, t in self._tallies.items() if s.fits(fmt)]
            own = [t.first for s, t in fits if s.format == fmt]
            # A format no row primarily is ranks after one with rows of its own.
            own_first = min(own, default=self._line)
            return -sum(t.count for _, t in fits), min(t.first for _, t in fits), own_first

        seen = [f for f in get_args(Format) if any(s.fits(f) for s in self._tallies)]
        return min(cast(list[Format], seen), key=rank, default=None)

    def _mismatches(self, fmt: Format, total: int, count: int) -> tuple[list[LineError], int]:
        errors: list[LineError] = []
        n = 0
        for shape, tally in self._tallies.items():
            if shape.fits(fmt):
                continue
            n += tally.count
            if fmt == "chat" and shape.from_messages:
                where, code, msg = (
                    "messages",
                    "no_assistant_turn",
                    "no assistant turn to learn from",
                )
            else:
                where, code = None, "format_mismatch"
                msg = (
                    f"row is in the {shape.format} format but the file is in the {fmt} format "
                    f"(as {count} of {total} valid rows)"
                )
            errors += [LineError(line, where, code, msg) for line in tally.lines]
        return errors, n

    def _build_report(self) -> ValidationReport:
        fmt = self._vote()
        errors, error_count, num_examples = list(self._errors), self._error_count, 0
        if fmt is not None:
            total = sum(t.count for t in self._tallies.values())
            num_examples = sum(t.count for s, t in self._tallies.items() if s.fits(fmt))
            extra, n = self._mismatches(fmt, total, num_examples)
            # Each source is capped at its first max_errors lines, so the merge's first
            # max_errors are exactly the file's first max_errors.
            errors = sorted(errors + extra, key=lambda e: e.line)
            error_count += n
        if self._rows == 0:
            errors, error_count = [LineError(1, None, "empty_file", "the file has no examples")], 1
        return ValidationReport(
            fmt, num_examples, errors[: self.max_errors], error_count, self._warnings()
        )

    def _warnings(self) -> list[str]:
        if not self._blank_count:
            return []
        lines = ", ".join(map(str, self._blank))
        more = self._blank_count - len(self._blank)
        lines += f" and {more} more" if more else ""
        noun = "line" if self._blank_count == 1 else "lines"
        return [f"skipped {self._blank_count} blank {noun} ({noun} {lines})"]


def validate_bytes(data: bytes, **kw: int) -> ValidationReport:
    """Validate a whole file held in memory (tests, small files)."""
    validator = DatasetValidator(**kw)
    validator.feed(data)
    return validator.finish()
