"""Type stub of the compiled extension ``diffcore._C`` (csrc/bindings.cpp and each op's registration).

The C ABI is narrow on purpose: every argument is keyword-only and is a data pointer
(``*_ptr`` or a buffer name such as ``x``, as ``int``), a size, a dtype name (``"float32"``...),
a scalar, a thread count, or a CUDA device index and stream handle (``int``). ``Extension`` is the
module's interface as a protocol, the type :func:`diffcore._ext.extension` returns; the module-level
names below are the same functions. Keep this file in step with the ``m.def`` calls in ``csrc/``:
``tests/test_ext_stub.py`` checks that the names and keyword arguments match the built module.

Functions of one family that share their leading keywords (the CPU and CUDA variants of a kernel,
the box kinds) take ``**kwargs: Unpack[...Keywords]``: exactly that TypedDict's fields, in order, the
base's fields first (the same runs ``keywords(...)`` spells once in ``csrc/``). A keywords TypedDict
has one base: mypy orders the fields of a TypedDict with several bases otherwise than Python does.
"""

import collections.abc
from typing import Protocol, TypedDict

from typing_extensions import Unpack

class BuildInfo(TypedDict):
    cuda_mode: str
    cuda: bool
    cuda_version: str | None
    cuda_archs: str | None
    openmp: bool
    compiler: str
    avx2: bool
    ops: list[str]

class BoxTileLayout(TypedDict):
    """Leading keywords of the box-sum tile kernels (csrc/local_denoise: box_tile)."""

    x_ptr: int
    y_ptr: int
    batch: int
    tile: int
    valid: int
    channels: int
    height: int
    width: int
    patch: int

class BoxTileKeywords(BoxTileLayout):
    """local_denoise_box_ls_tile and local_denoise_box_els_tile."""

    circular: bool
    inv2s2_ptr: int
    band: float
    dmin_ptr: int
    total_ptr: int
    acc_ptr: int
    threads: int

class BoxPspcTileKeywords(BoxTileLayout):
    """local_denoise_box_pspc_tile."""

    stage: str
    inv2s2_ptr: int
    band: float
    dmin_ptr: int
    total_ptr: int
    acc_ptr: int
    threads: int

class SameLocationKeywords(TypedDict):
    """Leading keywords of the same-location tile kernels (csrc/local_denoise: same_location, running_state)."""

    x_ptr: int
    y_ptr: int
    batch: int
    tile: int
    channels: int
    pixels: int
    locations: int
    support_offsets_ptr: int
    support_index_ptr: int
    support_weight_ptr: int
    out_offsets_ptr: int
    out_index_ptr: int
    inv2s2_ptr: int
    band: float
    dmin_ptr: int
    total_ptr: int
    acc_ptr: int

class SameLocationTileKeywords(SameLocationKeywords):
    """local_denoise_same_location_tile."""

    threads: int

class SameLocationCudaKeywords(SameLocationKeywords):
    """local_denoise_same_location_cuda."""

    device: int
    stream: int

class SamplerStepKeywords(TypedDict):
    """Leading keywords of the fused sampler steps (csrc/sampler_step: step_keywords)."""

    dtype: str
    x: int
    denoised: int
    extra: int
    noise: int
    out: int
    numel: int
    c_x: float
    c_denoised: float
    c_extra: float
    c_noise: float
    step: int
    flag: int

class SamplerStepCpuKeywords(SamplerStepKeywords):
    """sampler_step_cpu."""

    threads: int

class SamplerStepCudaKeywords(SamplerStepKeywords):
    """sampler_step_cuda."""

    device: int
    stream: int

class Extension(Protocol):
    # csrc/bindings.cpp
    def cuda_available(self) -> bool: ...
    def cuda_multiprocessor_count(self, *, device: int) -> int: ...
    def build_info(self) -> BuildInfo: ...
    # csrc/empirical_denoise/empirical_denoise.cpp
    def empirical_denoise_row_sqnorms(
        self, *, y_ptr: int, dtype: str, rows: int, dim: int, ld: int, out_ptr: int, threads: int
    ) -> None: ...
    def empirical_denoise_decode_rows(
        self, *, src_ptr: int, src_dtype: str, rows: int, dim: int, dst_ptr: int, dst_dtype: str, threads: int
    ) -> None: ...
    def empirical_denoise_tile_update(
        self,
        *,
        g_ptr: int,
        g_dtype: str,
        g_ld: int,
        p_ptr: int,
        batch: int,
        tile: int,
        x_ptr: int,
        x_ld: int,
        dim: int,
        xn2_ptr: int,
        inv2s2_ptr: int,
        y_ptr: int,
        y_dtype: str,
        y_ld: int,
        yn2_ptr: int,
        gemm_err_coef: float,
        rounding_coef: float,
        rescore_tol: float,
        band: float,
        rescore_budget: int,
        m_ptr: int,
        mlow_ptr: int,
        s_ptr: int,
        scale_ptr: int,
        threads: int,
    ) -> tuple[int, int]: ...
    def empirical_denoise_screen_collect(
        self,
        *,
        g_ptr: int,
        g_dtype: str,
        g_ld: int,
        batch: int,
        tile: int,
        start: int,
        xn2_ptr: int,
        inv2s2_ptr: int,
        yn2_ptr: int,
        gemm_err_coef: float,
        rounding_coef: float,
        band: float,
        mlow_ptr: int,
        cand_index_ptr: int,
        cand_upper_ptr: int,
        cand_count_ptr: int,
        cap: int,
        threads: int,
    ) -> int: ...
    def empirical_denoise_screen_finalize(
        self,
        *,
        x_ptr: int,
        x_ld: int,
        batch: int,
        dim: int,
        inv2s2_ptr: int,
        y_ptr: int,
        y_dtype: str,
        y_ld: int,
        mlow_ptr: int,
        cand_index_ptr: int,
        cand_upper_ptr: int,
        cand_count_ptr: int,
        cap: int,
        band: float,
        row_map_ptr: int,
        out_ptr: int,
        logz_ptr: int,
        threads: int,
    ) -> None: ...
    def empirical_denoise_sparse_accumulate(
        self,
        *,
        p_ptr: int,
        p_ld: int,
        batch: int,
        tile: int,
        scale_ptr: int,
        y_ptr: int,
        y_dtype: str,
        y_ld: int,
        dim: int,
        acc_ptr: int,
        acc_ld: int,
        threads: int,
    ) -> None: ...
    def empirical_denoise_cuda_forward(
        self,
        *,
        x_ptr: int,
        x_dtype: str,
        y_ptr: int,
        y_dtype: str,
        inv2s2_ptr: int,
        batch: int,
        rows: int,
        dim: int,
        splits: int,
        work_acc_ptr: int,
        work_m_ptr: int,
        work_s_ptr: int,
        out_ptr: int,
        logz_ptr: int,
        device: int,
        stream: int,
    ) -> None: ...
    # csrc/empirical_denoise/small_dim.cpp
    def empirical_denoise_small_dim(
        self,
        *,
        x_ptr: int,
        y_ptr: int,
        y_dtype: str,
        batch: int,
        rows: int,
        dim: int,
        inv2s2_ptr: int,
        gemm_err_coef: float,
        fp32_err_coef: float,
        rounding_coef: float,
        rescore_tol: float,
        band: float,
        tiny_tol: float,
        screen_ratio: float,
        screen_max_kept: int,
        out_ptr: int,
        logz_ptr: int,
        redo_ptr: int,
        parallel_min_work: int,
        threads: int,
    ) -> tuple[float, int, int, int, int]: ...
    # csrc/knn/knn.cpp
    def knn_cpu_prepare_rows(
        self,
        *,
        src_ptr: int,
        dtype: str,
        rows: int,
        dim: int,
        row_stride: int,
        dst_ptr: int,
        dst_dtype: str,
        int8_levels: int,
        norms_ptr: int,
        threads: int,
        arg_name: str,
    ) -> None: ...
    def knn_cpu_screen_tile(
        self,
        *,
        queries_ptr: int,
        queries_dtype: str,
        batch: int,
        dim: int,
        q_norms_ptr: int,
        train_ptr: int,
        train_dtype: str,
        tile_start: int,
        tile: int,
        y_norms_ptr: int,
        gram_ptr: int,
        gram_dtype: str,
        k: int,
        best_d2_ptr: int,
        best_idx_ptr: int,
        safety: float,
        threads: int,
    ) -> int: ...
    def knn_cuda(
        self,
        *,
        queries_ptr: int,
        train_ptr: int,
        train_dtype: str,
        batch: int,
        n_train: int,
        dim: int,
        k: int,
        tile: int,
        workspace_ptr: int,
        best_d2_ptr: int,
        best_idx_ptr: int,
        device: int,
        stream: int,
    ) -> None: ...
    # csrc/attention/attention.cpp
    def attention_forward(
        self,
        *,
        dtype: str,
        q: int,
        k: int,
        v: int,
        tq: int,
        tk: int,
        tv: int,
        o: int,
        to: int,
        lse: int,
        bh: int,
        lq: int,
        lk: int,
        d: int,
        scale: float,
        jvp: bool,
        device: int,
        stream: int,
    ) -> None: ...
    # csrc/sampler_step/sampler_step.cpp
    def sampler_step_cpu(self, **kwargs: Unpack[SamplerStepCpuKeywords]) -> int: ...
    # returns step(x, denoised, extra, noise, out, c_x, c_denoised, c_extra, c_noise, step) -> int,
    # the one callable of _C taking positional arguments (pointers as int; a sampler loop's hot path)
    def sampler_step_cpu_bind(self, *, dtype: str, numel: int, flag: int, threads: int) -> collections.abc.Callable: ...
    def sampler_step_cuda(self, **kwargs: Unpack[SamplerStepCudaKeywords]) -> int: ...
    # csrc/local_denoise/local_denoise.cpp (and local_denoise.cu)
    def local_denoise_translated_tile(
        self,
        *,
        xq_ptr: int,
        y_ptr: int,
        batch: int,
        tile: int,
        valid: int,
        channels: int,
        height: int,
        width: int,
        patch: int,
        row_lo_ptr: int,
        row_hi_ptr: int,
        col_lo_ptr: int,
        col_hi_ptr: int,
        inv2s2_ptr: int,
        band: float,
        dmin_ptr: int,
        total_ptr: int,
        acc_ptr: int,
        threads: int,
    ) -> None: ...
    def local_denoise_same_location_tile(self, **kwargs: Unpack[SameLocationTileKeywords]) -> None: ...
    def local_denoise_box_ls_tile(self, **kwargs: Unpack[BoxTileKeywords]) -> None: ...
    def local_denoise_box_els_tile(self, **kwargs: Unpack[BoxTileKeywords]) -> None: ...
    def local_denoise_box_pspc_tile(self, **kwargs: Unpack[BoxPspcTileKeywords]) -> None: ...
    def local_denoise_translated_cuda(
        self,
        *,
        xq_ptr: int,
        y_ptr: int,
        batch: int,
        tile: int,
        channels: int,
        height: int,
        width: int,
        patch: int,
        row_lo_ptr: int,
        row_hi_ptr: int,
        col_lo_ptr: int,
        col_hi_ptr: int,
        inv2s2_ptr: int,
        band: float,
        dmin_ptr: int,
        total_ptr: int,
        acc_ptr: int,
        device: int,
        stream: int,
    ) -> None: ...
    def local_denoise_same_location_cuda(self, **kwargs: Unpack[SameLocationCudaKeywords]) -> None: ...

_module: Extension
cuda_available = _module.cuda_available
cuda_multiprocessor_count = _module.cuda_multiprocessor_count
build_info = _module.build_info
empirical_denoise_row_sqnorms = _module.empirical_denoise_row_sqnorms
empirical_denoise_decode_rows = _module.empirical_denoise_decode_rows
empirical_denoise_tile_update = _module.empirical_denoise_tile_update
empirical_denoise_screen_collect = _module.empirical_denoise_screen_collect
empirical_denoise_screen_finalize = _module.empirical_denoise_screen_finalize
empirical_denoise_small_dim = _module.empirical_denoise_small_dim
empirical_denoise_sparse_accumulate = _module.empirical_denoise_sparse_accumulate
empirical_denoise_cuda_forward = _module.empirical_denoise_cuda_forward
knn_cpu_prepare_rows = _module.knn_cpu_prepare_rows
knn_cpu_screen_tile = _module.knn_cpu_screen_tile
knn_cuda = _module.knn_cuda
attention_forward = _module.attention_forward
sampler_step_cpu = _module.sampler_step_cpu
sampler_step_cpu_bind = _module.sampler_step_cpu_bind
sampler_step_cuda = _module.sampler_step_cuda
local_denoise_translated_tile = _module.local_denoise_translated_tile
local_denoise_same_location_tile = _module.local_denoise_same_location_tile
local_denoise_box_ls_tile = _module.local_denoise_box_ls_tile
local_denoise_box_els_tile = _module.local_denoise_box_els_tile
local_denoise_box_pspc_tile = _module.local_denoise_box_pspc_tile
local_denoise_translated_cuda = _module.local_denoise_translated_cuda
local_denoise_same_location_cuda = _module.local_denoise_same_location_cuda
