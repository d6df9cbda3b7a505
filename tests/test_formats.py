"""The formats users bring from other fine-tuning tools (pace_lm.data.formats, pace_lm.data.sources): each prepares the
same tokens and labels as the same conversations written as `messages`; tool turns masked or trained; gzip,
CSV and upper-case files; a folder's own train / test files kept as the splits; warnings where a user would
want one; and pace-train on data prepared from ShareGPT."""

import csv
import gzip
import json

import pytest
from conftest import run_cli

from pace_lm import PaceLMError
from pace_lm.config.compose import compose
from pace_lm.data import corpus
from pace_lm.data.formats import to_messages
from pace_lm.data.prepare import Request, prepare
from pace_lm.data.prepared import load_prepared
from pace_lm.run.train import train

TINY = [
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=2",
    "training.max_steps=2",
    "training.batch_size=2",
    "training.micro_batch_size=2",
    "training.max_seq_len=64",
    "training.eval_batches=1",
    "training.eval_interval=2",
    "training.log_interval=1",
    "training.progress=false",
    "training.device=cpu",
]


def exchanges(n=40):
    """n conversations of the offline corpus cut to a system turn, one question and its reply."""
    out = []
    for conv in corpus.offline_conversations()[:n]:
        turns = [m for m in conv["messages"] if m["role"] in ("user", "assistant")][:2]
        out.append([{"role": "system", "content": "You are terse."}, *turns])
    return out


def as_format(messages, fmt):
    system, user, assistant = (m["content"] for m in messages)
    if fmt == "messages":
        return {"messages": messages}
    if fmt == "content_parts":
        return {
            "messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        }
    if fmt == "sharegpt":
        return {
            "conversations": [
                {"from": "system", "value": system},
                {"from": "human", "value": user},
                {"from": "gpt", "value": assistant},
            ]
        }
    if fmt == "alpaca":
        return {"system": system, "instruction": user, "input": "", "output": assistant}
    if fmt == "prompt_completion":
        return {"prompt": messages[:2], "completion": messages[2:]}
    raise ValueError(fmt)


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def prepared(out, source, tokenizer, **kw):
    meta = prepare(str(out), Request(source=source, tokenizer=tokenizer, max_seq_len=128, val_size=5, **kw))
    train_ds, val_ds, _, _ = load_prepared(str(out))
    return meta, [train_ds[:], val_ds[:]]


@pytest.mark.parametrize("fmt", ["content_parts", "sharegpt", "alpaca", "prompt_completion"])
def test_each_format_prepares_what_the_same_messages_prepare(tmp_path, offline_data, fmt):
    tok = str(offline_data / "tokenizer")
    convs = exchanges()
    plain = write_jsonl(tmp_path / "m.jsonl", [as_format(c, "messages") for c in convs])
    _, want = prepared(tmp_path / "m", plain, tok)
    meta, got = prepared(tmp_path / "f", write_jsonl(tmp_path / "f.jsonl", [as_format(c, fmt) for c in convs]), tok)
    assert got == want
    assert meta["formats"] == {"messages" if fmt == "content_parts" else fmt: len(convs)}


def test_alpaca_input_and_string_prompt_completion_read_as_one_exchange():
    assert to_messages({"instruction": "Sum", "input": "2 and 3", "output": "5"}) == [
        {"role": "user", "content": "Sum\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert to_messages({"prompt": "Hi", "completion": "Hello"}) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert to_messages(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": "f?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "function", "content": "42"},
            ]
        }
    ) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "f?"},
        {"role": "assistant", "content": json.dumps(calls)},
        {"role": "tool", "content": "42"},
    ]
    with pytest.raises(PaceLMError, match="turn 1 is from 'robot'"):
        to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]})


@pytest.mark.parametrize("train_tool_turns", [False, True])
def test_tool_turns_are_masked_unless_asked(tmp_path, offline_data, offline_tokenizer, train_tool_turns):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"what is {i} squared?"},
                {"role": "assistant", "content": "calling the tool"},
                {"role": "tool", "content": f"TOOLRESULT {i * i}"},
                {"role": "assistant", "content": f"{i * i}"},
            ]
        }
        for i in range(12)
    ]
    source = write_jsonl(tmp_path / "t.jsonl", rows)
    _, (train_ds, _) = prepared(
        tmp_path / "p", source, str(offline_data / "tokenizer"), train_tool_turns=train_tool_turns
    )
    ids, labels = train_ds["input_ids"][0], train_ds["labels"][0]
    trained = offline_tokenizer.decode([t for t, y in zip(ids, labels) if y != -100])
    assert ("TOOLRESULT" in trained) == train_tool_turns and "calling the tool" in trained


def test_gzip_csv_and_upper_case_files_are_read(tmp_path, offline_data):
    tok = str(offline_data / "tokenizer")
    convs = exchanges(20)
    plain = write_jsonl(tmp_path / "m.jsonl", [as_format(c, "messages") for c in convs])
    _, want = prepared(tmp_path / "m", plain, tok)
    _, got = prepared(
        tmp_path / "gz", write_jsonl(tmp_path / "M.JSONL.GZ", [as_format(c, "messages") for c in convs], gzip.open), tok
    )
    assert got == want
    with open(tmp_path / "chats.CSV", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "messages"])
        writer.writerows([i, json.dumps(c)] for i, c in enumerate(convs))
    _, got = prepared(tmp_path / "csv", str(tmp_path / "chats.CSV"), tok)
    assert got == want


def test_a_bad_csv_row_is_named_by_its_line(tmp_path):
    from pace_lm.data.sources import load_source

    (tmp_path / "pc.csv").write_text("prompt,completion\nhi,hello\nonly a prompt\n")
    with pytest.raises(PaceLMError, match=r"pc.csv, line 3: no 'completion' field|pc.csv, line 3: 'prompt' and"):
        load_source(Request(source=str(tmp_path / "pc.csv"), format="prompt_completion"))


def test_a_folders_own_train_and_test_files_are_its_splits(tmp_path, offline_data, offline_tokenizer):
    """train.jsonl and test.jsonl in a folder are the splits, kept as given: not merged and re-split."""
    convs = [as_format(c, "messages") for c in exchanges(30)]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", convs[:24])
    write_jsonl(tmp_path / "data" / "test.jsonl", convs[24:])
    meta, (train_ds, val_ds) = prepared(tmp_path / "p", str(tmp_path / "data"), str(offline_data / "tokenizer"))
    assert meta["splits"] == "the source's own (train trained, test validated)"
    assert meta["counts"]["train"]["conversations"] == 24 and meta["counts"]["validation"]["conversations"] == 6
    replies = [c["messages"][2]["content"][:40] for c in convs]
    validation = [offline_tokenizer.decode(ids) for ids in val_ds["input_ids"]]
    assert [sum(r in text for r in replies[24:]) for text in validation] == [1] * len(validation)
    assert not any(r in text for r in replies[:24] for text in validation if r not in replies[24:])


def test_empty_replies_and_cut_conversations_are_said(tmp_path, offline_data):
    rows = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": ""}]}
        for i in range(20)
    ]
    meta, _ = prepared(tmp_path / "p", write_jsonl(tmp_path / "e.jsonl", rows), str(offline_data / "tokenizer"))
    assert any("have only empty assistant replies" in w for w in meta["warnings"])
    long = [
        {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 50}]}
        for _ in range(20)
    ]
    meta = prepare(
        str(tmp_path / "l"),
        Request(
            source=write_jsonl(tmp_path / "l.jsonl", long),
            tokenizer=str(offline_data / "tokenizer"),
            max_seq_len=230,
            val_size=5,
        ),
    )
    assert any("cut at max_seq_len=230" in w for w in meta["warnings"])


def test_pace_data_says_the_formats_and_pace_train_trains_on_sharegpt(tmp_path, offline_data):
    src = write_jsonl(tmp_path / "share.jsonl", [as_format(c, "sharegpt") for c in exchanges()])
    proc = run_cli(
        [
            "pace-data",
            "--source",
            src,
            "--tokenizer",
            str(offline_data / "tokenizer"),
            "--out",
            str(tmp_path / "prepared"),
            "--max-seq-len",
            "128",
            "--val-size",
            "5",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rows read as 40 sharegpt" in proc.stdout and "validation: held out at random" in proc.stdout
    record = train(
        compose([f"dataset.path={tmp_path / 'prepared'}", f"training.out_dir={tmp_path / 'out'}", "run_name=r", *TINY])
    )
    assert record["status"] == "complete" and record["summary"]["trained_tokens"] > 0


def test_a_hub_datasets_rows_are_converted_and_a_bad_one_named_by_its_row():
    """A hub dataset (here an in-memory one, as load_dataset gives it) goes through the same conversion."""
    from datasets import Dataset

    from pace_lm.data.sources import _converted

    rows = [as_format(c, "sharegpt") for c in exchanges(3)] + [as_format(c, "alpaca") for c in exchanges(2)]
    keys = {k for r in rows for k in r}  # a table's rows: every column, None where a row had none
    table = Dataset.from_list([{k: r.get(k) for k in sorted(keys)} | {"id": i} for i, r in enumerate(rows)])
    source = _converted(table, Request(source="owner/chats"))
    assert source.formats == {"sharegpt": 3, "alpaca": 2} and source.data.column_names == ["messages"]
    assert source.data[3]["messages"] == exchanges(2)[0]
    with pytest.raises(PaceLMError, match=r"'owner/chats', row 2 of split 'train': turn 0 is from 'robot'"):
        _converted(
            Dataset.from_list([rows[0], {"conversations": [{"from": "robot", "value": "x"}]}]),
            Request(source="owner/chats"),
        )


# ---- the files of public SFT datasets, in the layouts they ship in ------------------------------------------


def trained_texts(out, tokenizer):
    """Each prepared example's trained tokens, decoded, over both splits."""
    from pace_lm.data.prepared import IGNORE_INDEX

    train_ds, val_ds, _, _ = load_prepared(str(out))
    return sorted(
        tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        for ds in (train_ds, val_ds)
        for labels in ds["labels"]
    )


def replies(texts):
    return sorted("".join(f"{t}<|im_end|>" for t in conv) for conv in texts)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def oasst_rows(n_trees):
    """oasst1's layout: a message a row; tree t: a prompt, two ranked replies (rank 1 written first), a follow-up
    under the best reply and its one reply; the best path is prompt, best reply, follow-up, its reply."""
    rows = []
    for t in range(n_trees):
        ids = [f"{t}-{k}" for k in range(5)]
        rows += [
            dict(
                message_id=ids[0],
                parent_id=None,
                role="prompter",
                text=f"question {t}",
                rank=None,
                message_tree_id=str(t),
                lang="en",
                deleted=False,
            ),
            dict(
                message_id=ids[1],
                parent_id=ids[0],
                role="assistant",
                text=f"worse answer {t}",
                rank=1,
                message_tree_id=str(t),
                lang="en",
                deleted=False,
            ),
            dict(
                message_id=ids[2],
                parent_id=ids[0],
                role="assistant",
                text=f"best answer {t}",
                rank=0,
                message_tree_id=str(t),
                lang="en",
                deleted=False,
            ),
            dict(
                message_id=ids[3],
                parent_id=ids[2],
                role="prompter",
                text=f"and then {t}?",
                rank=0,
                message_tree_id=str(t),
                lang="en",
                deleted=False,
            ),
            dict(
                message_id=ids[4],
                parent_id=ids[3],
                role="assistant",
                text=f"then this {t}",
                rank=None,
                message_tree_id=str(t),
                lang="en",
                deleted=False,
            ),
        ]
    return rows


TOOLS = [
    {
        "name": "get_weather",
        "description": "the weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def test_the_common_sft_datasets_train_exactly_their_replies(tmp_path, offline_data, offline_tokenizer):
    """Alpaca as a JSON array, ShareGPT as JSON Lines (a piece starting with a reply, a tool-call row with its
    schemas), dolly as CSV and oasst1 as the hub's parquet folder: each prepares without editing, and the
    trained tokens are exactly the replies."""
    tok = str(offline_data / "tokenizer")
    alpaca = [
        {"instruction": f"Say {i}.", "input": "" if i % 2 else f"the number {i}", "output": f"It is {i}."}
        for i in range(12)
    ]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(alpaca, indent=1))
    sharegpt = [
        {
            "conversations": [
                {"from": "gpt", "value": f"...end of an earlier piece {i}"},
                {"from": "human", "value": f"next question {i}"},
                {"from": "gpt", "value": f"next answer {i}"},
            ]
        }
        for i in range(6)
    ]
    sharegpt += [
        {
            "conversations": [
                {"from": "human", "value": f"weather in city {i}?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": str(i)}})},
                {"from": "observation", "value": "sunny"},
                {"from": "gpt", "value": f"It is sunny in {i}."},
            ],
            "tools": json.dumps(TOOLS),
        }
        for i in range(6)
    ]
    write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt)
    with open(tmp_path / "dolly.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["instruction", "context", "response", "category"])
        writer.writeheader()
        writer.writerows(
            {
                "instruction": f"Who is {i}?",
                "context": "" if i % 3 else f"{i} is a number.",
                "response": f"{i} is a number.",
                "category": "open_qa",
            }
            for i in range(12)
        )
    write_parquet(tmp_path / "oasst1" / "data" / "train-00000-of-00001.parquet", oasst_rows(8))
    write_parquet(tmp_path / "oasst1" / "data" / "validation-00000-of-00001.parquet", oasst_rows(10)[40:])

    cases = {
        "alpaca_data.json": ("alpaca", [[a["output"]] for a in alpaca]),
        "sharegpt.jsonl": (
            "sharegpt",
            [[r["conversations"][-1]["value"]] for r in sharegpt[:6]]
            + [[r["conversations"][1]["value"], r["conversations"][3]["value"]] for r in sharegpt[6:]],
        ),
        "dolly.csv": ("dolly", [[f"{i} is a number."] for i in range(12)]),
        "oasst1": ("oasst", [[f"best answer {t}", f"then this {t}"] for t in range(10)]),
    }
    for name, (fmt, want) in cases.items():
        out = tmp_path / f"prepared_{fmt}"
        meta = prepare(str(out), Request(source=str(tmp_path / name), tokenizer=tok, max_seq_len=256, val_size=3))
        assert meta["formats"] == {fmt: len(want)}, name
        assert trained_texts(out, offline_tokenizer) == replies(want), name
    sharegpt_meta = json.loads((tmp_path / "prepared_sharegpt" / "meta.json").read_text())
    assert sharegpt_meta["conversions"] == {"leading_replies_dropped": 6, "tools_rendered": 6}
    assert any("6 of 12 conversations began with an assistant reply" in w for w in sharegpt_meta["warnings"])
    texts = [
        offline_tokenizer.decode(ids) for ids in load_prepared(str(tmp_path / "prepared_sharegpt"))[0]["input_ids"]
    ]
    weather = [t for t in texts if "weather in city" in t]
    assert weather and all(
        '<tools>\n{"name": "get_weather"' in t and t.index("<tools>") < t.index("weather in city") for t in weather
    )  # the schemas in the system turn, before the prompt


def test_a_table_of_any_columns_by_columns(tmp_path, offline_data, offline_tokenizer):
    with open(tmp_path / "support.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ticket", "question", "answer"])
        writer.writerows([i, f"my order {i} is late", f"sorry about order {i}"] for i in range(10))
    tok = str(offline_data / "tokenizer")
    with pytest.raises(PaceLMError, match="--columns prompt=COLUMN,response=COLUMN"):
        prepare(str(tmp_path / "p0"), Request(source=str(tmp_path / "support.csv"), tokenizer=tok))
    proc = run_cli(
        [
            "pace-data",
            "--source",
            str(tmp_path / "support.csv"),
            "--tokenizer",
            tok,
            "--out",
            str(tmp_path / "p"),
            "--columns",
            "prompt=question,response=answer",
            "--val-size",
            "2",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rows read as 10 columns" in proc.stdout
    assert trained_texts(tmp_path / "p", offline_tokenizer) == replies([[f"sorry about order {i}"] for i in range(10)])
    proc = run_cli(
        [
            "pace-data",
            "--source",
            str(tmp_path / "support.csv"),
            "--tokenizer",
            tok,
            "--out",
            str(tmp_path / "q"),
            "--columns",
            "prompt=question,reply=answer",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "ROLE=COLUMN" in proc.stderr


def test_the_hubs_parquet_layout_keeps_its_test_split_out_of_training(tmp_path, offline_data, offline_tokenizer):
    """data/train-00000-of-00001.parquet and data/test-00000-of-00001.parquet: no test conversation is trained."""
    convs = [as_format(c, "messages") for c in exchanges(30)]
    write_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", convs[:20])
    write_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", convs[20:])
    (tmp_path / "hub" / "README.md").write_text("---\nlicense: mit\n---\n")
    meta, (train_ds, val_ds) = prepared(tmp_path / "p", str(tmp_path / "hub"), str(offline_data / "tokenizer"))
    assert meta["splits"] == "the source's own (train trained, test validated)"
    assert meta["counts"]["train"]["conversations"] == 20 and meta["counts"]["validation"]["conversations"] == 10
    test_replies = [c["messages"][2]["content"][:40] for c in convs[20:]]
    trained = [offline_tokenizer.decode(ids) for ids in train_ds["input_ids"]]
    assert not any(r in text for r in test_replies for text in trained)


def test_split_families_are_chosen_never_merged(tmp_path, offline_data):
    """ultrachat's layout: train_sft, test_sft, train_gen, test_gen shards. Refused in one line naming the splits
    and the flags; --train-split / --validation-split choose; a file not named after a split beside them is refused."""
    from pace_lm.data.sources import load_source

    convs = [as_format(c, "messages") for c in exchanges(16)]
    for i, split in enumerate(["train_sft", "test_sft", "train_gen", "test_gen"]):
        for shard in range(2):
            write_parquet(
                tmp_path / "uc" / "data" / f"{split}-0000{shard}-of-00002.parquet",
                convs[4 * i + 2 * shard : 4 * i + 2 * shard + 2],
            )
    with pytest.raises(
        PaceLMError,
        match=r"has 2 train splits \(train_gen, train_sft\): choose with --train-split and "
        r"--validation-split",
    ):
        load_source(Request(source=str(tmp_path / "uc")))
    source = load_source(Request(source=str(tmp_path / "uc"), train_split="train_sft", validation_split="test_sft"))
    assert source.split_names == {"train": "train_sft", "validation": "test_sft"}
    assert len(source.splits["train"]) == 4 and len(source.splits["validation"]) == 4
    assert source.splits["train"][0]["messages"] == convs[0]["messages"]
    with pytest.raises(PaceLMError, match="--train-split 'train_all' is not a split of"):
        load_source(Request(source=str(tmp_path / "uc"), train_split="train_all", validation_split="test_sft"))
    write_parquet(tmp_path / "uc" / "data" / "extra.parquet", convs[:1])
    with pytest.raises(PaceLMError, match="mixes files named after splits"):
        load_source(Request(source=str(tmp_path / "uc"), train_split="train_sft", validation_split="test_sft"))
