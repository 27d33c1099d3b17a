"""The CPU screening choice (diffcore._cpu_caps): capability rules, forced values, bad values."""

import pytest

from diffcore import _cpu_caps
from diffcore._cpu_caps import CpuCaps, choose_screen

BF16_MACHINE = CpuCaps("AVX512", ("avx512_bf16",), None, None, True)
AVX2_MACHINE = CpuCaps("AVX2", (), None, None, True)


def test_auto_picks_bf16_only_where_bf16_matmul_is_native():
    assert choose_screen(None, BF16_MACHINE).precision == "bf16"
    assert choose_screen("auto", BF16_MACHINE).precision == "bf16"
    choice = choose_screen("", AVX2_MACHINE)
    assert choice.precision == "fp32" and "avx512_bf16" in choice.reason


@pytest.mark.parametrize(
    "caps,expected_reason",
    [
        (CpuCaps("AVX2", ("avx512_bf16",), None, None, True), "ATEN_CPU_CAPABILITY"),
        (CpuCaps("AVX512", ("amx_bf16",), "AVX2", "AVX2", True), "ONEDNN_MAX_CPU_ISA=AVX2"),
        (CpuCaps("AVX512", ("avx512_bf16",), "AVX512_CORE", None, True), "ONEDNN_MAX_CPU_ISA=AVX512_CORE"),
        (CpuCaps("AVX512", ("avx512_bf16",), None, None, False), "oneDNN"),
    ],
)
def test_caps_that_disable_native_bf16(caps, expected_reason):
    choice = choose_screen("auto", caps)
    assert choice.precision == "fp32" and expected_reason in choice.reason
    assert caps.kind != "bf16"


def test_onednn_cap_that_keeps_bf16():
    caps = CpuCaps("AVX512", ("avx512_bf16",), "AVX512_CORE_BF16", None, True)
    assert choose_screen("auto", caps).precision == "bf16" and caps.kind == "bf16"


@pytest.mark.parametrize("value", ["bf16", "fp32", " FP32 "])
@pytest.mark.parametrize("caps", [BF16_MACHINE, AVX2_MACHINE])
def test_forced_values_win_over_the_machine(value, caps):
    choice = choose_screen(value, caps)
    assert choice.precision == value.strip().lower()
    assert "DIFFCORE_CPU_SCREEN" in choice.reason


@pytest.mark.parametrize("value", ["fp16", "int4", "yes", "bf-16"])
def test_invalid_value_names_the_variable(value):
    with pytest.raises(ValueError, match="DIFFCORE_CPU_SCREEN.*auto, int8, bf16, fp32"):
        choose_screen(value, BF16_MACHINE)


@pytest.mark.parametrize("levels", [127, 63])
@pytest.mark.parametrize("caps", [BF16_MACHINE, AVX2_MACHINE])
def test_knn_takes_int8_where_the_probe_finds_an_exact_int8_gemm(caps, levels):
    choice = choose_screen("auto", caps, int8_probe=lambda: levels)
    assert choice.knn_precision == "int8" and choice.int8_levels == levels and str(levels) in choice.knn_reason
    assert choice.precision == ("bf16" if caps is BF16_MACHINE else "fp32")  # empirical_denoise: the float choice
    forced = choose_screen("int8", caps, int8_probe=lambda: levels)
    assert forced.knn_precision == "int8" and "DIFFCORE_CPU_SCREEN=int8" in forced.knn_reason


def test_without_an_exact_int8_gemm_knn_follows_the_float_choice():
    choice = choose_screen("auto", AVX2_MACHINE, int8_probe=lambda: None)
    assert choice.knn_precision == choice.precision == "fp32" and choice.int8_levels is None
    with pytest.raises(ValueError, match="DIFFCORE_CPU_SCREEN=int8.*probe failed"):
        choose_screen("int8", AVX2_MACHINE, int8_probe=lambda: None)
    forced = choose_screen("bf16", AVX2_MACHINE, int8_probe=lambda: 127)  # a forced float screen covers knn too
    assert forced.knn_precision == "bf16" and forced.int8_levels is None


def test_screen_choice_reads_the_variable_once(monkeypatch):
    _cpu_caps.screen_choice.cache_clear()
    try:
        monkeypatch.setenv("DIFFCORE_CPU_SCREEN", "fp32")
        assert _cpu_caps.screen_precision() == "fp32"
        monkeypatch.setenv("DIFFCORE_CPU_SCREEN", "bf16")
        assert _cpu_caps.screen_precision() == "fp32"  # decided once per process
        _cpu_caps.screen_choice.cache_clear()
        monkeypatch.setenv("DIFFCORE_CPU_SCREEN", "nonsense")
        with pytest.raises(ValueError, match="DIFFCORE_CPU_SCREEN"):
            _cpu_caps.screen_precision()
    finally:
        _cpu_caps.screen_choice.cache_clear()


def test_read_caps_on_this_machine():
    caps = _cpu_caps.read_caps()
    assert caps.torch_capability  # e.g. AVX2, AVX512
    assert set(caps.bf16_flags) <= set(_cpu_caps.BF16_FLAGS)
    assert caps.as_dict()["kind"] == caps.kind
