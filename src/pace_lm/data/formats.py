"""The conversation formats pace-data reads, each converted into the one form it tokenizes: a list of
{role, content} messages, roles system / user / assistant / tool, content a string.

    messages            {"messages": [{"role", "content"}]} (OpenAI / TRL conversational): content may be
                        a list of parts ({"type": "text", "text": ...}); "developer" is a system turn,
                        "function" a tool turn; an assistant turn of tool_calls only is its calls as JSON
    sharegpt            {"conversations": [{"from", "value"}]}: human / gpt / system, observation and
                        tool / function_response (tool turns), function_call (an assistant turn)
    alpaca              {"instruction", "input" (optional), "output", "system" (optional)}: one exchange,
                        the input after the instruction, separated by a blank line
    prompt_completion   TRL's {"prompt", "completion"}: two strings (a user turn and a reply), or two lists
                        of messages (the prompt's turns, then the completion's)

A row's format is told by its fields (`detect`), or forced (pace-data --format). Tool turns are inputs the
model reads, masked like user turns unless pace-data --train-tool-turns.
"""

import json

from pace_lm import PaceLMError

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system", "function": "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool", "tool": "tool", "function_response": "tool"}
FIELDS = {  # the fields that tell a row's format, in the order they are tried
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
FORMATS = tuple(FIELDS)


def detect(row):
    """The format whose fields `row` (a dict) has, or None. A field that is None is absent: a table of rows
    of several formats (a parquet file, a hub dataset) gives each row every column, None where it had none."""
    for name, fields in FIELDS.items():
        if all(row.get(f) is not None for f in fields):
            return name
    return None


def describe_missing(row):
    """What a row of no known format has, and what each format needs: for a one-line error."""
    keys = ", ".join(str(k) for k, v in row.items() if v is not None) or "none"
    wanted = "; ".join(f"{name}: {' + '.join(repr(f) for f in fields)}" for name, fields in FIELDS.items())
    return f"no conversation format's fields (its keys: {keys}; {wanted})"


def to_messages(row, fmt=None):
    """The row's conversation as [{role, content}] (roles of ROLES, content strings); `fmt` None: detected."""
    fmt = fmt or detect(row)
    if fmt is None:
        hint = "; a 'text' field is pretraining data: --mode pretrain" if isinstance(row.get("text"), str) else ""
        raise PaceLMError(describe_missing(row) + hint)
    if fmt not in CONVERTERS:
        raise PaceLMError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    missing = [f for f in FIELDS[fmt] if row.get(f) is None]
    if missing:
        raise PaceLMError(f"no {', '.join(repr(f) for f in missing)} field for --format {fmt} "
                          f"(its keys: {', '.join(map(str, row)) or 'none'})")
    return CONVERTERS[fmt](row)


def _messages(row):
    return [_message(m, i) for i, m in enumerate(_list(row["messages"], "messages"))]


def _message(m, i):
    if not isinstance(m, dict):
        raise PaceLMError(f"message {i} is {type(m).__name__}, not {{role, content}}")
    role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
    content = m.get("content")
    if role == "assistant" and content in (None, "", []) and m.get("tool_calls"):
        content = json.dumps(m["tool_calls"], ensure_ascii=False)
    if isinstance(content, list):  # OpenAI's content parts: the text parts, joined
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise PaceLMError(f"message {i} has content parts that are not all text ({{type: text, text}})")
        content = "".join(texts)
    if role not in ROLES or not isinstance(content, str):
        raise PaceLMError(f"message {i} has role={m.get('role')!r} and content of type {type(content).__name__}: "
                          f"expected a role in {ROLES} and a string")
    return {"role": role, "content": content}


def _sharegpt(row):
    out = []
    for i, turn in enumerate(_list(row["conversations"], "conversations")):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            who = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            raise PaceLMError(f"turn {i} is from {who!r}: expected one of {', '.join(SHAREGPT_ROLES)}")
        out.append(_message({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")}, i))
    return out


def _alpaca(row):
    instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
    for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise PaceLMError(f"{name!r} is {type(value).__name__}, not a string")
    system = row.get("system")
    system = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _prompt_completion(row):
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        return [_message(m, i) for i, m in enumerate(prompt + completion)]
    raise PaceLMError(f"'prompt' and 'completion' are {type(prompt).__name__} and {type(completion).__name__}: "
                      f"two strings, or two lists of messages")


def _list(value, name):
    if not isinstance(value, list):
        raise PaceLMError(f"{name!r} is {type(value).__name__}, not a list")
    return value


CONVERTERS = {"messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca, "prompt_completion": _prompt_completion}
assert set(CONVERTERS) == set(FIELDS)
