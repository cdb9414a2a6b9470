"""Tokenizer references, as transformers gives them, for texts that exercise the tokenizers
(whitespace runs, newlines, digits, non-ASCII, emoji):

* tests/fixtures/tiny-llama-tokens.json: full token ids of the tiny fixture's byte-level BPE
  tokenizer (read by tests/tiny_model.rs);
* tests/fixtures/tiny-spm.gguf: a SentencePiece BPE vocabulary (`tokenizer.ggml.model =
  llama`: pieces with `▁`, scores, 256 byte tokens, no merges) written with gguf-py, trained on
  the fixture corpus; tests/fixtures/tiny-spm-tokens.json: the ids and decoded text of
  transformers' GGUF tokenizer loader for it (read by tests/gguf_import.rs).

Usage: V/bin/python scripts/make_tokenizer_reference.py   (needs transformers, gguf, tokenizers)
"""
import json
import os
import sys

import gguf
from tokenizers.implementations import SentencePieceBPETokenizer
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from make_tiny_fixture import CORPUS  # noqa: E402

root = os.path.join(os.path.dirname(__file__), "..")
fixture = os.path.join(root, "tests", "fixtures", "tiny-llama")
tok = AutoTokenizer.from_pretrained(fixture)
texts = [
    "The quick brown fox jumps over the lazy dog and keeps running far away.",
    "Masks are learned together with the target widths under a minimax game.",
    "  leading spaces,   runs of spaces\nnew lines\n\n\tand tabs ",
    "In 2024, 3.14159 of 1,000,000 items cost $12.50 (about 11.6 EUR).",
    "naïve café — Zürich, 東京, Москва 🙂",
]
out = {
    "generated_by": "scripts/make_tokenizer_reference.py",
    "texts": texts,
    "input_ids": [tok(t).input_ids for t in texts],
}


def write_json(name, value):
    path = os.path.join(root, "tests", "fixtures", name)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)
    print(path)


write_json("tiny-llama-tokens.json", out)

# A SentencePiece BPE vocabulary as llama.cpp stores one: control tokens, byte tokens, then
# the pieces with descending scores (their merge order).
spm = SentencePieceBPETokenizer(unk_token="<unk>")
spm.train_from_iterator(CORPUS, vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
by_id = sorted(spm.get_vocab().items(), key=lambda kv: kv[1])
tokens = [t for t, _ in by_id[:3]] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in by_id[3:]]
scores = [0.0] * 259 + [-float(n) for n in range(len(by_id) - 3)]
types = [2, 3, 3] + [6] * 256 + [1] * (len(by_id) - 3)  # unknown, control, byte, normal
gguf_path = os.path.join(root, "tests", "fixtures", "tiny-spm.gguf")
w = gguf.GGUFWriter(gguf_path, "llama")
w.add_tokenizer_model("llama")
w.add_token_list(tokens)
w.add_token_scores(scores)
w.add_token_types(types)
w.add_unk_token_id(0)
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.add_add_bos_token(True)
w.add_add_eos_token(False)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
hf = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
ids = [hf(t).input_ids for t in texts]
write_json("tiny-spm-tokens.json", {
    "generated_by": "scripts/make_tokenizer_reference.py (transformers' GGUF tokenizer loader)",
    "texts": texts,
    "input_ids": ids,
    "decoded": [hf.decode(i, skip_special_tokens=True) for i in ids],
})
