"""Writes a tiny real GGUF model: a 2-layer llama with random weights and SmolLM2's tokenizer.

llama.cpp loads and runs it in milliseconds, so integration tests exercise real inference cheaply. The
text it produces is noise; what matters is that every token went through llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmsd.gguf_header import read_header

TOKENIZER_ARRAYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"})


def write_tiny_model(dest: Path, tokenizer_from: Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                     n_ff: int = 128, context_length: int = 2048, seed: int = 0,
                     chat_template: str | None = None) -> Path:
    """`chat_template`: the template the model carries instead of the tokenizer's (SmolLM2's ChatML)."""
    from gguf import GGUFWriter

    tok = read_header(tokenizer_from, keep_arrays=TOKENIZER_ARRAYS).fields
    tokens: list[str] = tok["tokenizer.ggml.tokens"]
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape: int, dtype: type = np.float32) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(dtype)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    w = GGUFWriter(str(tmp), "llama")
    w.add_name("lms tiny test model")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(1)  # mostly F16
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(tokens)
    w.add_token_types(tok["tokenizer.ggml.token_type"])
    w.add_token_merges(tok["tokenizer.ggml.merges"])
    w.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    if chat_template is not None or "tokenizer.chat_template" in tok:
        w.add_chat_template(chat_template if chat_template is not None else tok["tokenizer.chat_template"])
    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd, dtype=np.float16))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(dest)
    return dest
