"""Full token ids of the tiny fixture's tokenizer, as transformers gives them, for texts that
exercise byte-level BPE (whitespace runs, newlines, digits, non-ASCII, emoji):
tests/fixtures/tiny-llama-tokens.json, read by tests/tiny_model.rs.

Usage: V/bin/python scripts/make_tokenizer_reference.py   (needs transformers)
"""
import json
import os

from transformers import AutoTokenizer

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
path = os.path.join(root, "tests", "fixtures", "tiny-llama-tokens.json")
with open(path + ".tmp", "w") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
os.replace(path + ".tmp", path)
print(path, [len(i) for i in out["input_ids"]])
