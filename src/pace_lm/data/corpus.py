"""The offline corpus: text every Python install ships, turned into conversations and documents.

No network, no download: the standard library's docstrings (read with `ast`, nothing is imported) and
the `pydoc_data` help topics. The same Python version gives the same corpus, byte for byte; its sha256
goes into the prepared data's metadata so that a different stdlib is visible, not silent.
"""

import ast
import functools
import hashlib
import os
import random
import sysconfig

SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "__pycache__",
    "turtledemo",
    "ensurepip",
}
MIN_DOC_CHARS = 40  # shorter docstrings ("Return self.") carry little to learn
MAX_REPLY_CHARS = 1200  # a reply is cut at a paragraph boundary below this

SYSTEM_PROMPTS = [
    "You are a helpful assistant who knows the Python standard library.",
    "You answer questions about Python precisely and briefly.",
]
DOC_QUESTIONS = [
    "What does `{name}` do?",
    "Explain `{name}`.",
    "What is `{name}` for?",
    "Describe `{name}` from the Python standard library.",
]
TOPIC_QUESTIONS = ["Explain the Python topic '{name}'.", "Tell me about '{name}' in Python."]
FOLLOW_UPS = ["Go on.", "Continue, please.", "And then?"]


@functools.cache  # parsed once per process: conversations, tokenizer and fingerprint all read it
def stdlib_docstrings():
    """((qualified name, docstring), ...) from the stdlib's .py files, in a fixed (sorted) order."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        rel = os.path.relpath(dirpath, root)
        package = [] if rel == "." else rel.split(os.sep)
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            module = package + ([] if filename == "__init__.py" else [filename[:-3]])
            with open(os.path.join(dirpath, filename), encoding="utf-8", errors="replace") as f:
                try:
                    tree = ast.parse(f.read())
                except SyntaxError:  # a few stdlib files are templates, not Python
                    continue
            docs.extend(_docstrings(tree, ".".join(module)))
    return tuple((name, doc) for name, doc in docs if len(doc) >= MIN_DOC_CHARS)


def _docstrings(node, prefix):
    doc = ast.get_docstring(node)
    out = [(prefix, doc)] if doc else []
    for child in node.body:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not child.name.startswith("_") or child.name == "__init__":
                out.extend(_docstrings(child, f"{prefix}.{child.name}"))
    return out


def pydoc_topics():
    """[(topic, text)] of the interactive help's topics, sorted by topic."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _chunks(text, limit=MAX_REPLY_CHARS):
    """Split text at paragraph boundaries into pieces of at most about `limit` characters."""
    chunks, current = [], ""
    for para in text.strip().split("\n\n"):
        if current and len(current) + len(para) + 2 > limit:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    return [c[:limit] for c in chunks]


def offline_conversations(seed=0):
    """Chat conversations ({"messages": [...]}) about the stdlib, deterministic for a given seed.

    One per docstring (a question naming the object, the docstring's first part as the reply) and one
    per help topic (multi-turn: the user asks for more, the assistant continues). Some have a system
    prompt, so the masking of system turns is exercised by real data, not only by the tests.
    """
    rng = random.Random(seed)
    conversations = []
    for name, doc in stdlib_docstrings():
        messages = [
            {"role": "user", "content": rng.choice(DOC_QUESTIONS).format(name=name)},
            {"role": "assistant", "content": _chunks(doc)[0]},
        ]
        conversations.append(_maybe_system(rng, messages))
    for name, text in pydoc_topics():
        messages = [{"role": "user", "content": rng.choice(TOPIC_QUESTIONS).format(name=name)}]
        for i, chunk in enumerate(_chunks(text)[:3]):
            if i:
                messages.append({"role": "user", "content": rng.choice(FOLLOW_UPS)})
            messages.append({"role": "assistant", "content": chunk})
        conversations.append(_maybe_system(rng, messages))
    return conversations


def _maybe_system(rng, messages):
    if rng.random() < 0.25:
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
    return {"messages": messages}


def offline_documents():
    """Plain-text documents (for pretraining mode and for training the offline tokenizer)."""
    docs = [f"{name}\n\n{doc}" for name, doc in stdlib_docstrings()]
    return docs + [text for _, text in pydoc_topics()]


def corpus_sha256():
    """Fingerprint of the source text, so a different Python's stdlib shows up in the metadata."""
    h = hashlib.sha256()
    for doc in offline_documents():
        h.update(doc.encode())
        h.update(b"\0")
    return h.hexdigest()


# ---- the offline tokenizer ---------------------------------------------------------

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_offline_tokenizer(vocab_size=4096):
    """A byte-level BPE tokenizer trained on the offline corpus with `tokenizers`, with ChatML tokens.

    Returned as a transformers `PreTrainedTokenizerFast`, so it saves, loads and formats chats like a
    hub tokenizer. Byte-level: any text encodes, nothing is unknown.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(offline_documents(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, additional_special_tokens=[IM_START]
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast
