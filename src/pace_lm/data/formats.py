"""The conversation formats pace-data reads, each converted into the one form it tokenizes: a list of
{role, content} messages, roles system / user / assistant / tool, content a string.

    messages            {"messages": [{"role", "content"}]} (OpenAI / TRL conversational): content may be
                        a list of parts ({"type": "text", "text": ...}); "developer" is a system turn,
                        "function" a tool turn; an assistant turn of tool_calls only is its calls as JSON
    sharegpt            {"conversations": [{"from", "value"}]}: human / gpt / system, observation and
                        tool / function_response (tool turns), function_call (an assistant turn)
    alpaca              {"instruction", "input" (optional), "output", "system" (optional)}: one exchange,
                        the input after the instruction, separated by a blank line
    dolly               databricks-dolly-15k's {"instruction", "context" (optional), "response"}: as alpaca,
                        the context after the instruction
    prompt_completion   TRL's {"prompt", "completion"}: two strings (a user turn and a reply), or two lists
                        of messages (the prompt's turns, then the completion's)
    oasst               OpenAssistant's message trees (oasst1, oasst2): rows {"message_id", "parent_id",
                        "role": prompter | assistant, "text", "rank"}, one message each. Each tree becomes
                        one conversation: its root prompt, then at every turn the best-ranked reply (rank 0
                        first; unranked after ranked; then the earliest row), to a leaf. Deleted messages
                        are left out. A file's (or a split's) rows are read together.
    (columns)           any table, by `pace-data --columns prompt=COL,response=COL[,context=COL][,system=COL]`:
                        one exchange, as alpaca (e.g. a CSV of question,answer); counted as "columns"

A row's format is told by its fields (`detect`), or forced (pace-data --format). Tool turns are inputs the
model reads, masked like user turns unless pace-data --train-tool-turns.

What every format gets after conversion, counted in meta.json's "conversions":
- "tools" (a row's function schemas: a list, or a JSON string of one, as ShareGPT tool-call sets and
  OpenAI-style rows carry them) are rendered into the system turn the way ChatML models' chat templates do
  (Qwen2.5's and Hermes': a "# Tools" section with one JSON schema a line inside <tools></tools>), so the
  model sees the functions it is trained to call (tools_rendered);
- assistant turns before the first user or tool turn (a long chat split into pieces, whose later pieces
  start with a reply to a prompt that is in another piece) are dropped: a reply is trained only after
  something it answers (leading_replies_dropped).
"""

import json

from pace_lm import PaceLMError

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system", "function": "tool"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function_response": "tool",
}
FIELDS = {  # the fields that tell a row's format, in the order they are tried
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "dolly": ("instruction", "response"),
    "prompt_completion": ("prompt", "completion"),
    "oasst": ("message_id", "role", "text"),
}
FORMATS = tuple(FIELDS)
COLUMN_ROLES = ("prompt", "response", "context", "system")  # --columns: what a table's columns can be
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)


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
    return (
        f"no conversation format's fields (its keys: {keys}; {wanted}); a table of other columns: "
        f"pace-data --columns prompt=COLUMN,response=COLUMN"
    )


def to_messages(row, fmt=None, notes=None):
    """The row's conversation as [{role, content}] (roles of ROLES, content strings); `fmt` None: detected.
    `notes` (a dict) counts what the conversion did (the module's docstring: tools_rendered,
    leading_replies_dropped)."""
    fmt = fmt or detect(row)
    if fmt is None:
        hint = "; a 'text' field is pretraining data: --mode pretrain" if isinstance(row.get("text"), str) else ""
        raise PaceLMError(describe_missing(row) + hint)
    if fmt not in CONVERTERS:
        raise PaceLMError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "oasst":
        raise PaceLMError("an oasst row is one message of a tree: its file's rows are read together")
    missing = [f for f in FIELDS[fmt] if row.get(f) is None]
    if missing:
        raise PaceLMError(
            f"no {', '.join(repr(f) for f in missing)} field for --format {fmt} "
            f"(its keys: {', '.join(map(str, row)) or 'none'})"
        )
    return finish(CONVERTERS[fmt](row), row.get("tools"), notes)


def finish(messages, tools=None, notes=None):
    """What every format gets after conversion: the tools rendered into the system turn, the replies before
    the first prompt dropped (the module's docstring), each counted in `notes`."""
    notes = {} if notes is None else notes
    if tools not in (None, "", []):
        messages = _with_tools(messages, tools)
        notes["tools_rendered"] = notes.get("tools_rendered", 0) + 1
    first = next((i for i, m in enumerate(messages) if m["role"] in ("user", "tool")), len(messages))
    leading = [i for i in range(first) if messages[i]["role"] == "assistant"]
    if leading:
        messages = [m for i, m in enumerate(messages) if i not in leading]
        notes["leading_replies_dropped"] = notes.get("leading_replies_dropped", 0) + 1
    return messages


def _with_tools(messages, tools):
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise PaceLMError(f"'tools' is a string that is not JSON ({e.msg}, column {e.colno})") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise PaceLMError(f"'tools' is {type(tools).__name__}: expected a list of function schemas (objects)")
    block = TOOLS_HEADER + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + "\n</tools>"
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def map_columns(row, columns):
    """A table's row under --columns {role: column} as an alpaca row (prompt = instruction, context = input,
    response = output, system = system)."""
    missing = [c for role, c in columns.items() if role in ("prompt", "response") and row.get(c) is None]
    if missing:
        raise PaceLMError(
            f"no {', '.join(repr(c) for c in missing)} column for --columns "
            f"(its keys: {', '.join(map(str, row)) or 'none'})"
        )
    mapped = {"instruction": row[columns["prompt"]], "output": row[columns["response"]]}
    for role, key in (("context", "input"), ("system", "system")):
        if role in columns and row.get(columns[role]) is not None:
            mapped[key] = row[columns[role]]
    return mapped


def parse_columns(text):
    """pace-data --columns "prompt=question,response=answer": {role: column}, prompt and response needed."""
    columns = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, sep, column = part.partition("=")
        if not sep or role not in COLUMN_ROLES or not column:
            raise PaceLMError(
                f"--columns {text!r}: each part is ROLE=COLUMN with ROLE one of "
                f"{', '.join(COLUMN_ROLES)} (e.g. prompt=question,response=answer)"
            )
        columns[role] = column
    if not {"prompt", "response"} <= set(columns):
        raise PaceLMError(
            f"--columns {text!r} names no "
            f"{' and no '.join(r for r in ('prompt', 'response') if r not in columns)} column"
        )
    return columns


def oasst_conversations(rows, notes=None):
    """OpenAssistant's message rows as conversations: one per tree, its best-ranked path (the docstring)."""
    order = {id(r): i for i, r in enumerate(rows)}
    children = {}
    for row in rows:
        if row.get("deleted"):
            continue
        if row.get("role") not in ("prompter", "assistant") or not isinstance(row.get("text"), str):
            raise PaceLMError(
                f"message {row.get('message_id')!r} has role={row.get('role')!r} and text of type "
                f"{type(row.get('text')).__name__}: expected prompter or assistant, and a string"
            )
        children.setdefault(row.get("parent_id"), []).append(row)

    def best(rows_):
        return min(rows_, key=lambda r: (r.get("rank") is None, r.get("rank") or 0, order[id(r)]))

    out = []
    for root in children.get(None, []):
        node, messages = root, []
        while node is not None:
            messages.append({"role": "user" if node["role"] == "prompter" else "assistant", "content": node["text"]})
            kids = children.get(node["message_id"])
            node = best(kids) if kids else None
        out.append(finish(messages, None, notes))
    return out


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
        raise PaceLMError(
            f"message {i} has role={m.get('role')!r} and content of type {type(content).__name__}: "
            f"expected a role in {ROLES} and a string"
        )
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


def _dolly(row):
    return _alpaca(
        {
            "instruction": row["instruction"],
            "input": row.get("context"),
            "output": row["response"],
            "system": row.get("system"),
        }
    )


def _prompt_completion(row):
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        return [_message(m, i) for i, m in enumerate(prompt + completion)]
    raise PaceLMError(
        f"'prompt' and 'completion' are {type(prompt).__name__} and {type(completion).__name__}: "
        f"two strings, or two lists of messages"
    )


def _list(value, name):
    if not isinstance(value, list):
        raise PaceLMError(f"{name!r} is {type(value).__name__}, not a list")
    return value


CONVERTERS = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "dolly": _dolly,
    "prompt_completion": _prompt_completion,
    "oasst": None,
}  # oasst: a file's rows together
