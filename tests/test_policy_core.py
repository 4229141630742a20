"""Policy core pieces that need no engine: the per-version prompt style, the dtype choice."""

import json

from policy_svc.core import cpu_has_bf16, resolve_dtype
from rstar.artifacts import model_few_shot


def test_fine_tuned_version_turns_few_shot_off(tmp_path):
    assert model_few_shot(tmp_path, True) is True  # no metadata: the service default
    (tmp_path / "rstar_model.json").write_text(json.dumps({"few_shot": False}))
    assert model_few_shot(tmp_path, True) is False


def test_unreadable_or_odd_metadata_keeps_the_default(tmp_path):
    (tmp_path / "rstar_model.json").write_text("{not json")
    assert model_few_shot(tmp_path, True) is True
    (tmp_path / "rstar_model.json").write_text(json.dumps({"few_shot": "no"}))
    assert model_few_shot(tmp_path, False) is False


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_auto_dtype_is_float32_on_a_cpu_without_native_bf16():
    assert not cpu_has_bf16(AVX2_ONLY)
    assert resolve_dtype("auto", gpu=False, cpuinfo=AVX2_ONLY) == "float32"


def test_auto_dtype_is_bfloat16_on_gpu_or_bf16_cpu():
    assert cpu_has_bf16(SAPPHIRE)
    assert resolve_dtype("auto", gpu=False, cpuinfo=SAPPHIRE) == "bfloat16"
    assert resolve_dtype("auto", gpu=True, cpuinfo=AVX2_ONLY) == "bfloat16"


def test_explicit_dtype_is_kept():
    assert resolve_dtype("bfloat16", gpu=False, cpuinfo=AVX2_ONLY) == "bfloat16"
    assert resolve_dtype("float16", gpu=True) == "float16"


def test_cpu_threads_all_binds_every_core_this_process_may_use():
    from policy_svc.core import cpu_thread_binding

    assert cpu_thread_binding("all", [0, 1]) == "0-1"
    assert cpu_thread_binding("all", [0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert cpu_thread_binding("all", [3]) == "3"
    assert cpu_thread_binding("auto") is None          # vLLM's own (one core of two here)
    assert cpu_thread_binding("0,2") == "0,2"


def test_cpu_threads_setting_is_validated():
    import pytest

    from policy_svc.config import PolicyConfig
    from rstar.config import ConfigError

    for good in ("all", "auto", "0-1", "0,2-3"):
        PolicyConfig(cpu_threads=good).validate()
    for bad in ("", "1-", "x", "0;1"):
        with pytest.raises(ConfigError):
            PolicyConfig(cpu_threads=bad).validate()
