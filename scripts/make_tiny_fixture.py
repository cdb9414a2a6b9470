#!/usr/bin/env python3
"""Generate the committed test fixtures under tests/fixtures/ (run once, by hand).

* tiny-llama/: a random LLaMA-architecture checkpoint with grouped-query attention
  (2 layers, hidden 64, 4 query / 2 KV heads, MLP 128, untied LM head) in f32 safetensors,
  with a small byte-level BPE tokenizer, saved by transformers' save_pretrained.
* tiny-llama-reference.json: transformers' logits for two token sequences, dense and with
  masks (a zeroed query head, zeroed and scaled MLP channels) applied where maskprune applies
  them: to each head's attention output before o_proj, to silu(gate)*up before down_proj.
* tiny-llama.gguf: the same model written as llama.cpp writes LLaMA GGUFs (llama.cpp tensor
  names, q/k rows permuted, tokenizer as metadata), all F32, so the import must reproduce the
  checkpoint exactly.
* tiny-qwen2/, tiny-mistral/ (+ -reference.json): one-layer models of the other two
  families (Qwen2 has q/k/v biases and tied embeddings), with transformers' logits.
* tiny-qwen3/ (+ -reference.json): a two-layer Qwen3 (per-head q/k RMSNorm, an explicit
  head_dim of 16 with hidden 32, no biases), with transformers' logits dense and masked.
  `scripts/make_tiny_fixture.py qwen3` writes only this one (the others stay as they are).
* tiny-gemma3/ (+ -reference.json): a two-layer Gemma-3 text model (GeGLU, `1 + w` norms,
  sandwich norms, q/k norms, embeddings scaled by sqrt(hidden), a sliding-window layer with
  RoPE base 10,000 before a global layer with base 1e6 and linear scaling 2, and
  `query_pre_attn_scalar` 24 against a head_dim of 16), tied embeddings, with transformers'
  logits dense and masked, and for a 40-token row past the 16-token window.
  `scripts/make_tiny_fixture.py gemma3` writes only this one, and adds an 80-token row (past
  its 64-token window) to tiny-mistral-reference.json.
* gguf-quant-vectors.json: random blocks of every supported quantised type and gguf-py's
  dequantisation of them, to check our dequantisers bit for bit.

Usage: V/bin/python scripts/make_tiny_fixture.py   (needs torch, transformers, gguf, tokenizers)
"""
import json
import os

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import sys

from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Structured pruning removes attention heads and MLP channels.",
    "Every layer keeps the same width, so the model stays a standard LLaMA.",
    "Masks are learned together with the target widths under a minimax constraint.",
    "Perplexity on WikiText-2 and accuracy on seven zero-shot tasks are reported.",
] * 20


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=288, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def permute(w, n_head, n_head_kv):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def masked_logits(model, ids, head_masks, channel_masks):
    """Logits with per-layer masks applied as maskprune applies them."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    handles = []
    for i, layer in enumerate(model.model.layers):
        hm, cm = head_masks[i], channel_masks[i]
        if hm is not None:
            scale = torch.tensor(hm, dtype=torch.float32).repeat_interleave(hd)
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, s=scale: (a[0] * s,)))
        if cm is not None:
            scale = torch.tensor(cm, dtype=torch.float32)
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, s=scale: (a[0] * s,)))
    out = model(ids).logits
    for h in handles:
        h.remove()
    return out


def quant_vectors():
    rng = np.random.default_rng(7)
    types = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
    out = []
    for name in types:
        qt = gguf.GGMLQuantizationType[name]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
        blocks = rng.integers(0, 256, size=(2, type_size), dtype=np.uint8)
        # Put small finite f16 scales where the layouts keep them.
        def set_f16(b, off, val):
            b[off:off + 2] = np.frombuffer(np.float16(val).tobytes(), dtype=np.uint8)
        for b in blocks:
            if name in ("Q4_0", "Q5_0", "Q8_0"):
                set_f16(b, 0, rng.uniform(0.01, 0.1))
            elif name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
                set_f16(b, 0, rng.uniform(0.01, 0.1))
                set_f16(b, 2, rng.uniform(-0.1, 0.1) if name in ("Q4_1", "Q5_1") else rng.uniform(0.0, 0.05))
            elif name == "Q6_K":
                set_f16(b, type_size - 2, rng.uniform(0.001, 0.01))
        values = gguf.quants.dequantize(blocks.reshape(-1), qt).reshape(-1)
        out.append({"type": name, "block_size": block_size, "bytes_hex": blocks.tobytes().hex(),
                    "values": [float(v) for v in values]})
    return out


def family_fixture(name, config_cls, model_cls, tok, extra, layers=1, masks=False):
    """A model of another family, saved in f16, with transformers' logits (and, with `masks`,
    the logits under one zeroed and one halved query head and every third channel zeroed)."""
    torch.manual_seed(1)
    cfg = config_cls(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0, **extra)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_((1.0 + 0.1 * torch.randn_like(p)) if pname.endswith("norm.weight") else 0.15 * torch.randn_like(p))
            p.copy_(p.half().float())
    model_dir = os.path.join(OUT, name)
    model.half().save_pretrained(model_dir, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(model_dir)
    model = model_cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("Every layer keeps the same width, so the model stays standard.").ids[:10]])
    r = lambda t: [float(f"{v:.7g}") for v in t.reshape(-1).tolist()]
    with torch.no_grad():
        logits = model(ids).logits
    out = {"generated_by": "scripts/make_tiny_fixture.py", "transformers_class": type(model).__name__,
           "input_ids": ids.tolist(), "logits": r(logits)}
    if masks:
        heads = cfg.num_attention_heads
        head_masks = [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.5, 1.0]][:layers]
        channel_masks = [None, [0.0 if c % 3 == 0 else 1.0 for c in range(cfg.intermediate_size)]][:layers]
        assert all(len(m) == heads for m in head_masks)
        with torch.no_grad():
            masked = masked_logits(model, ids, head_masks, channel_masks)
        out.update({"head_masks": head_masks, "channel_masks": channel_masks, "masked_logits": r(masked)})
    with open(os.path.join(OUT, f"{name}-reference.json"), "w") as f:
        json.dump(out, f)


def qwen3_fixture(tok):
    family_fixture("tiny-qwen3", Qwen3Config, Qwen3ForCausalLM, tok,
                   {"head_dim": 16, "tie_word_embeddings": False, "rope_theta": 1e6}, layers=2, masks=True)


def long_reference(name, model_cls, tok, length):
    """Adds transformers' logits for one row of `length` tokens, longer than the fixture's
    sliding window, to NAME-reference.json (`long_input_ids`, `long_logits`)."""
    model = model_cls.from_pretrained(os.path.join(OUT, name), dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(" ".join(CORPUS[:8])).ids[:length]])
    assert ids.shape[1] == length
    with torch.no_grad():
        logits = model(ids).logits
    path = os.path.join(OUT, f"{name}-reference.json")
    ref = json.load(open(path))
    ref.update({"long_input_ids": ids.tolist(), "long_logits": [float(f"{v:.7g}") for v in logits.reshape(-1).tolist()]})
    with open(path, "w") as f:
        json.dump(ref, f)


def gemma3_fixture(tok):
    family_fixture("tiny-gemma3", Gemma3TextConfig, Gemma3ForCausalLM, tok,
                   {"head_dim": 16, "tie_word_embeddings": True, "sliding_window": 16,
                    "layer_types": ["sliding_attention", "full_attention"],
                    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 1e6}},
                    "query_pre_attn_scalar": 24, "pad_token_id": 0}, layers=2, masks=True)
    long_reference("tiny-gemma3", Gemma3ForCausalLM, tok, 40)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tok = build_tokenizer()
    if sys.argv[1:] == ["gemma3"]:
        gemma3_fixture(tok)
        long_reference("tiny-mistral", MistralForCausalLM, tok, 80)
        print("wrote", os.path.join(OUT, "tiny-gemma3"), "and the long Mistral reference")
        return
    if sys.argv[1:] == ["qwen3"]:
        qwen3_fixture(tok)
        print("wrote", os.path.join(OUT, "tiny-qwen3"))
        return
    vocab_size = tok.get_vocab_size()
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
            # Exactly representable in f16, so the f16 files below hold the very same model.
            p.copy_(p.half().float())
    model_dir = os.path.join(OUT, "tiny-llama")
    model.half().save_pretrained(model_dir, safe_serialization=True)
    # The reference is what transformers computes from the saved files (half() would also
    # have rounded the rotary buffers of the in-memory model).
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(model_dir)

    texts = ["The quick brown fox jumps over the lazy dog and keeps running far away.",
             "Masks are learned together with the target widths under a minimax game."]
    ids = [tok.encode(t).ids for t in texts]
    n = min(12, *(len(i) for i in ids))
    ids = torch.tensor([i[:n] for i in ids])
    heads = cfg.num_attention_heads
    head_masks = [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.5, 1.0]]
    channel_masks = [None, [0.0 if c % 3 == 0 else 1.0 for c in range(cfg.intermediate_size)]]
    with torch.no_grad():
        dense = model(ids).logits
        masked = masked_logits(model, ids, head_masks, channel_masks)
        ones = masked_logits(model, ids, [[1.0] * heads] * 2, [[1.0] * cfg.intermediate_size] * 2)
        assert torch.equal(ones, dense)
    def r(t):
        return [float(f"{v:.7g}") for v in t.reshape(-1).tolist()]
    ref = {"generated_by": "scripts/make_tiny_fixture.py", "transformers_class": type(model).__name__,
           "input_ids": ids.tolist(), "texts": texts, "logits_shape": list(dense.shape), "logits": r(dense),
           "head_masks": head_masks, "channel_masks": channel_masks, "masked_logits": r(masked)}
    with open(os.path.join(OUT, "tiny-llama-reference.json"), "w") as f:
        json.dump(ref, f)

    # The same model as a llama.cpp-style GGUF (all F32).
    w = gguf.GGUFWriter(os.path.join(OUT, "tiny-llama.gguf"), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    # Matrices as F16 (exact: the weights are f16 values), vectors as F32 as llama.cpp does.
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if ".q_proj." in hf:
            t = permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
        elif ".k_proj." in hf:
            t = permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
        w.add_tensor(gg, np.ascontiguousarray(t.astype(np.float16) if t.ndim == 2 else t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    family_fixture("tiny-qwen2", Qwen2Config, Qwen2ForCausalLM, tok, {"tie_word_embeddings": True, "rope_theta": 1e6})
    family_fixture("tiny-mistral", MistralConfig, MistralForCausalLM, tok, {"sliding_window": 64, "rope_theta": 1e4})
    long_reference("tiny-mistral", MistralForCausalLM, tok, 80)
    qwen3_fixture(tok)
    gemma3_fixture(tok)
    with open(os.path.join(OUT, "gguf-quant-vectors.json"), "w") as f:
        json.dump({"generated_by": "scripts/make_tiny_fixture.py (gguf-py dequantize)", "vectors": quant_vectors()}, f)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
