"""nsa_hf.sample_data: the stdlib corpus split, the small BPE tokenizer and the token blocks that the demo, the
FSDP check and the research harnesses train on."""
import zlib

import pytest
import torch

from nsa_hf.convert import stdlib_python_files
from nsa_hf.sample_data import EOS, stdlib_documents, token_blocks, train_tokenizer


def test_stdlib_split_is_fixed_by_file_name():
    train, held_out = stdlib_documents(min_chars=8000, max_chars=200_000, held_out_every=5)
    assert train and held_out
    assert (train, held_out) == stdlib_documents(min_chars=8000, max_chars=200_000, held_out_every=5)
    by_text = {}
    for path in stdlib_python_files(8000):
        by_text.setdefault(path.read_text(encoding="utf-8", errors="replace"), zlib.crc32(path.name.encode()) % 5 == 0)
    assert all(by_text[t] for t in held_out) and not any(by_text[t] for t in train)


def test_stdlib_documents_rejects_a_split_without_training_files():
    with pytest.raises(ValueError, match="held_out_every=1"):
        stdlib_documents(held_out_every=1)


def test_token_blocks_never_span_two_documents():
    tok = train_tokenizer(["alpha beta gamma delta\n" * 40, "one two three four five\n" * 40], vocab_size=300)
    docs = ["alpha beta " * 30, "three four " * 7, "gamma delta " * 25]
    blocks = token_blocks(tok, docs, seq_len=16)
    ids = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs]
    expected = [doc[i:i + 16] for doc in ids for i in range(0, len(doc) - 15, 16)]
    assert blocks.dtype == torch.long and blocks.tolist() == expected
    assert token_blocks(tok, docs, seq_len=16, max_blocks=2).tolist() == expected[:2]
    assert tok.eos_token == EOS and tok.decode(tok("x = 1\n")["input_ids"]) == "x = 1\n"


def test_bad_sizes_are_rejected():
    tok = train_tokenizer(["a b c\n" * 20], vocab_size=300)
    with pytest.raises(ValueError, match="seq_len=1"):
        token_blocks(tok, ["a b"], seq_len=1)
    with pytest.raises(ValueError, match="no document has 999 tokens"):
        token_blocks(tok, ["a b"], seq_len=999)
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["a"], vocab_size=100)
