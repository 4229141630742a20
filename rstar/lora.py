"""LoRA adapters as files, and merging one into a base checkpoint at the file level.

A fine-tuned policy is shipped (and published) as its LoRA adapter: `LORA_FILE`
holds, for every adapted linear layer `W` (HF weight name `<module>.weight`),
`<module>.lora_A` (r x in) and `<module>.lora_B` (out x r); its metadata holds
the rank, alpha and the base checkpoint's identity. The merged weight is
`W + (alpha / r) * B @ A`, computed in fp32 and cast to the output dtype.

`merge_into` works on safetensors files, without building a model, so the
trainer and a fresh clone's first start produce the same bytes from the same
base and adapter (the trainer publishes the merged directory it made this way;
the shipped round is materialised with the same function).

Not here: training (trainer.sft), which versions are shipped (rstar.evolved),
the registry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

LORA_FILE = "lora_adapter.safetensors"
WEIGHT_SUFFIX = ".weight"


class AdapterError(ValueError):
    """An adapter that does not fit its base checkpoint, or an unreadable adapter file."""


def from_peft_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """peft's `get_peft_model_state_dict` (keys `base_model.model.<module>.lora_A.weight`) ->
    this module's names (`<module>.lora_A`), detached and contiguous."""
    out = {}
    for key, value in state.items():
        name = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.weight"
            if name.endswith(tag):
                out[name[: -len(tag)] + "." + part] = value.detach().contiguous()
                break
        else:
            raise AdapterError(f"not a LoRA A/B tensor: {key} (only linear-layer adapters are shipped)")
    return out


def save_adapter(path: str | Path, tensors: Mapping[str, Any], *, r: int, alpha: float,
                 base: Mapping[str, Any], dtype: str = "bfloat16") -> Path:
    """Write an adapter file: `tensors` (this module's names) in `dtype`, with its hyperparameters."""
    import torch
    from safetensors.torch import save_file

    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    for m in modules:
        if f"{m}.lora_A" not in tensors or f"{m}.lora_B" not in tensors:
            raise AdapterError(f"{m}: an adapter needs both lora_A and lora_B")
    cast = getattr(torch, dtype)
    meta = {"r": str(r), "alpha": str(alpha), "base": json.dumps(dict(base), sort_keys=True),
            "modules": str(len(modules))}
    path = Path(path)
    save_file({k: v.to(cast).contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, info) of an adapter file; info has r, alpha, scale and base."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        r, alpha = int(meta["r"]), float(meta["alpha"])
        base = json.loads(meta.get("base", "{}"))
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: not a readable LoRA adapter ({e})") from e
    return tensors, {"r": r, "alpha": alpha, "scale": alpha / r, "base": base}


def merge_into(base_dir: str | Path, adapter_path: str | Path, out_dir: str | Path,
               dtype: str = "bfloat16") -> dict[str, Any]:
    """Write `out_dir` = the base checkpoint with the adapter merged into its weights, in `dtype`.

    Every file of `base_dir` other than its safetensors is copied as it is (config, tokenizer,
    generation config); `config.json`'s dtype is updated. `out_dir` must not exist yet (callers
    write into a temporary directory and rename it: rstar.artifacts.atomic_dir). Raises
    AdapterError when an adapted module has no weight in the base or the shapes do not fit.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    lora, info = read_adapter(adapter_path)
    modules = sorted({k.rsplit(".", 1)[0] for k in lora})
    pending = {m + WEIGHT_SUFFIX: m for m in modules}
    out_dir.mkdir(parents=True, exist_ok=False)
    cast = getattr(torch, dtype)
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise AdapterError(f"{base_dir}: no safetensors weights to merge into")
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                w = f.get_tensor(key)
                if key in pending:
                    m = pending.pop(key)
                    a, b = lora[m + ".lora_A"].float(), lora[m + ".lora_B"].float()
                    if b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1] or a.shape[0] != b.shape[1]:
                        raise AdapterError(f"{m}: adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit "
                                           f"the base weight {tuple(w.shape)}")
                    w = w.float() + info["scale"] * (b @ a)
                tensors[key] = w.to(cast).contiguous() if w.is_floating_point() else w
        save_file(tensors, str(out_dir / shard.name), metadata={**meta, "format": "pt"})
    if pending:
        raise AdapterError(f"the base checkpoint {base_dir} has no weight for adapted modules: "
                           f"{', '.join(sorted(pending.values())[:3])}")
    for p in base_dir.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and not p.name.startswith("."):
            shutil.copy2(p, out_dir / p.name)
    index = out_dir / "model.safetensors.index.json"
    cfg_path = out_dir / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        for key in ("dtype", "torch_dtype"):   # transformers 5 writes `dtype`, older ones `torch_dtype`
            if key in cfg or key == "dtype":
                cfg[key] = dtype
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if index.is_file():  # sizes in the index change with the dtype
        idx = json.loads(index.read_text())
        idx.setdefault("metadata", {})["total_size"] = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
        index.write_text(json.dumps(idx, indent=2))
    return {"modules": len(modules), **{k: v for k, v in info.items() if k != "base"}}
