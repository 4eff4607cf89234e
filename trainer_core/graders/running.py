"""What runs outside this interpreter: regexes in a child interpreter that is killed when it
runs too long, ``http`` reward functions at an allowed host, and trained reward models
through the caller's function (the worker's; the API has none). http requests go only
where ``trainer_core.outbound`` allows, to the address it checked.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trainer_core import outbound
from trainer_core.graders.fields import GraderError, float_list
from trainer_core.graders.templates import Sample, no_constant, render

RewardModelFn = Callable[[str, list[dict[str, Any]], list[str]], list[float]]

MAX_HTTP_RESPONSE_BYTES = 16 * 1024 * 1024
# A regex runs in a child interpreter that is killed after this long (per batch of samples):
# Python's re cannot be interrupted, and a pattern can backtrack for ever.
REGEX_TIMEOUT_S = 5.0

REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}


def regex_flags(flags: str) -> int:
    value = 0
    for ch in flags:
        value |= REGEX_FLAGS[ch]
    return value


@dataclass(frozen=True)
class Env:
    reward_model: RewardModelFn | None
    http_allowed_hosts: tuple[str, ...]
    http_timeout_s: float


_REGEX_CHILD = (
    "import json,re,sys\n"
    "d=json.load(sys.stdin)\n"
    "p=re.compile(d['pattern'],d['flags'])\n"
    "f=p.fullmatch if d['mode']=='fullmatch' else p.search\n"
    "sys.stdout.write(json.dumps([f(t) is not None for t in d['texts']]))\n"
)


def regex_match_all(function: dict[str, Any], texts: list[str], param: str) -> list[bool]:
    """Match in a child interpreter killed after REGEX_TIMEOUT_S: a pattern that backtracks
    catastrophically fails the step with a clear error instead of hanging the worker."""
    if not texts:
        return []
    payload = json.dumps(
        {
            "pattern": function["pattern"],
            "flags": regex_flags(function["flags"]),
            "mode": function["mode"],
            "texts": texts,
        }
    ).encode("ascii")
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _REGEX_CHILD],
            input=payload,
            capture_output=True,
            timeout=REGEX_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GraderError(
            f"{param}.pattern",
            f"regex '{function['name']}' ran longer than {REGEX_TIMEOUT_S:g}s on {len(texts)} "
            "sample(s) (catastrophic backtracking?); simplify the pattern.",
        ) from None
    if done.returncode != 0:
        raise GraderError(
            f"{param}.pattern",
            f"regex '{function['name']}' failed: {done.stderr.decode(errors='replace')[-500:]}",
        )
    result = json.loads(done.stdout)
    return [bool(v) for v in result]


def evaluate_reward_model(
    function: dict[str, Any], samples: list[Sample], env: Env, param: str
) -> list[float]:
    if env.reward_model is None:
        raise GraderError(
            f"{param}.type",
            f"'{function['name']}' is a {function['type']} grader: it scores with a trained reward "
            "model, which runs on the workers during training (the API has no torch), so it "
            "cannot run here. /validate checks it.",
        )
    if function["type"] == "score_model" and function["input"]:
        items: list[dict[str, Any]] = []
        completions: list[str] = []
        for sample in samples:
            messages = [
                {
                    "role": m["role"],
                    "content": render(m["content"], sample, f"{param}.input[{j}].content"),
                }
                for j, m in enumerate(function["input"])
            ]
            if messages[-1]["role"] == "assistant":
                completions.append(messages.pop()["content"])
            else:
                completions.append(sample.output_text)
            items.append({"messages": messages})
    else:
        items = [dict(sample.item) for sample in samples]
        completions = [sample.output_text for sample in samples]
    try:
        raw = env.reward_model(function["model"], items, completions)
    except GraderError:
        raise
    except Exception as exc:
        raise GraderError(
            f"{param}.model", f"reward model '{function['model']}' failed: {exc}"
        ) from exc
    values = float_list(raw, len(samples), f"reward model '{function['model']}'", f"{param}.model")
    if function["type"] == "score_model":
        low, high = function["range"]
        values = [low + (high - low) * _sigmoid(v) for v in values]
    return values


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


# The setting that lists the hosts http reward functions may reach, named in refusals.
HOSTS_SETTING = "ALIGND_REWARD_HTTP_ALLOWED_HOSTS"


def allowed_url(url: str, hosts: Sequence[str], param: str) -> outbound.Destination:
    """Where an http function's ``url`` may be sent: the outbound host policy with the
    operator's allowlist and no other public hosts (docs/operations.md, "Outbound requests")."""
    try:
        policy = outbound.HostPolicy.from_entries(hosts, allow_public=False, setting=HOSTS_SETTING)
    except ValueError as exc:
        raise GraderError(param, f"{HOSTS_SETTING} has a malformed entry: {exc}.") from None
    try:
        return outbound.check(policy, url)
    except outbound.Refused as exc:
        listed = ", ".join(h.strip() for h in hosts if h.strip()) or "none"
        raise GraderError(
            param,
            f"http reward function URL refused: {exc}; allowed: {listed}. "
            "Ask the operator to add it.",
        ) from None


def evaluate_http(
    function: dict[str, Any], samples: list[Sample], env: Env, param: str
) -> list[float]:
    url = function["url"]
    destination = allowed_url(url, env.http_allowed_hosts, f"{param}.url")
    timeout = min(function.get("timeout_s", env.http_timeout_s), env.http_timeout_s)
    body = json.dumps(
        {"items": [dict(s.item) for s in samples], "completions": [s.output_text for s in samples]}
    ).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "alignd-grader"}
    who = f"http reward function '{function['name']}' ({url})"
    deadline = time.monotonic() + timeout
    connection = outbound.connection(destination, timeout)
    try:
        connection.request("POST", destination.target, body=body, headers=headers)
        response = connection.getresponse()
        if not 200 <= response.status < 300:
            # A redirect too: it could lead off the allowlist, so it is an error, never followed.
            detail = response.read(500).decode(errors="replace")
            raise GraderError(
                f"{param}.url", f"{who} answered HTTP {response.status}: {detail}".rstrip(": ")
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := response.read(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_HTTP_RESPONSE_BYTES:
                raise GraderError(
                    f"{param}.url", f"{who} answered more than {MAX_HTTP_RESPONSE_BYTES} bytes."
                )
            if time.monotonic() > deadline:
                raise TimeoutError
    except GraderError:
        raise
    except TimeoutError:
        raise GraderError(f"{param}.url", f"{who} did not answer within {timeout:g}s.") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise GraderError(f"{param}.url", f"{who} could not be reached: {exc}.") from None
    finally:
        connection.close()
    try:
        answer = json.loads(b"".join(chunks), parse_constant=no_constant)
    except ValueError:
        raise GraderError(f"{param}.url", f"{who} did not answer JSON.") from None
    if not isinstance(answer, dict) or "rewards" not in answer:
        raise GraderError(
            f"{param}.url", f'{who} must answer {{"rewards": [one number per sample]}}.'
        )
    return float_list(answer["rewards"], len(samples), who, f"{param}.url")
