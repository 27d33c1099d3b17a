"""Bad input gets a clear error that names the argument, the step and the sigma."""

from __future__ import annotations

import math

import pytest
import torch

import diffcore.sampler as S


def _x(b=2, d=12):
    return 80.0 * torch.randn(b, d, dtype=torch.float64)


@pytest.mark.parametrize("solver", list(S.SOLVERS))
def test_sigmas_must_descend_and_end_in_zero(solver, gaussian):
    fn = S.SOLVERS[solver]
    with pytest.raises(ValueError, match=r"sigmas: expected strictly descending.*sigmas\[1\]"):
        fn(gaussian, _x(), [80.0, 90.0, 0.0])
    with pytest.raises(ValueError, match="sigmas: expected strictly descending"):
        fn(gaussian, _x(), [80.0, 5.0, 5.0, 0.0])
    with pytest.raises(ValueError, match="final value must be 0"):
        fn(gaussian, _x(), [80.0, 5.0, 0.5])
    with pytest.raises(ValueError, match="sigmas: expected finite"):
        fn(gaussian, _x(), [math.nan, 1.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        fn(gaussian, _x(), [0.0])
    # a positive final sigma is allowed when asked for
    assert fn(gaussian, _x(), [80.0, 5.0, 0.5], require_zero_end=False).shape == (2, 12)


@pytest.mark.parametrize("solver", list(S.SOLVERS))
def test_denoiser_output_of_wrong_shape(solver):
    def bad(x, s):
        return x[:, :-1]

    with pytest.raises(
        ValueError, match=r"denoiser: returned shape \(2, 11\), expected \(2, 12\).*step 0 \(sigma 80\)"
    ):
        S.SOLVERS[solver](bad, _x(), S.karras_sigmas(4))
    with pytest.raises(TypeError, match="denoiser: expected a tensor"):
        S.SOLVERS[solver](lambda x, s: x.numpy(), _x(), S.karras_sigmas(4))


@pytest.mark.parametrize("solver", list(S.SOLVERS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_denoiser_output_names_step_and_sigma(solver, bad, gaussian):
    sigmas = S.karras_sigmas(6)
    threshold = float(sigmas[3])

    def breaks_at_low_noise(x, s):
        out = gaussian(x, s)
        return out * bad if float(s[0]) <= threshold * 1.0001 else out

    with pytest.raises(FloatingPointError, match=r"step (2|3) \(sigma .*\).*denoiser"):
        S.SOLVERS[solver](breaks_at_low_noise, _x(), sigmas)


def test_nonfinite_initial_state(gaussian):
    x = _x()
    x[1, 3] = math.nan
    with pytest.raises(FloatingPointError, match="state at step 0"):  # found by the first fused step
        S.sample_euler(lambda xx, s: xx * 0.5, x, S.karras_sigmas(4))
    out = S.sample_euler(gaussian, x, S.karras_sigmas(4), check_finite=False)  # opt-out
    assert torch.isnan(out).any()


def test_sample_arguments(gaussian):
    with pytest.raises(ValueError, match="seeds: expected at least one seed"):
        S.sample(gaussian, seeds=[], shape=(12,))
    with pytest.raises(ValueError, match="seeds: expected non-negative"):
        S.sample(gaussian, seeds=[1, -2], shape=(12,))
    with pytest.raises(TypeError, match="seeds"):
        S.sample(gaussian, seeds=5, shape=(12,))
    with pytest.raises(ValueError, match="shape"):
        S.sample(gaussian, seeds=[1], shape=(0, 12))
    with pytest.raises(ValueError, match="solver"):
        S.sample(gaussian, seeds=[1], shape=(12,), solver="rk45")
    with pytest.raises(ValueError, match="batch_size"):
        S.sample(gaussian, seeds=[1], shape=(12,), batch_size=0)
    with pytest.raises(ValueError, match="n: expected an integer"):
        S.karras_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min, sigma_max"):
        S.karras_sigmas(10, sigma_min=5.0, sigma_max=1.0)


def test_other_arguments(gaussian):
    with pytest.raises(TypeError, match="denoiser"):
        S.sample_euler(None, _x(), S.karras_sigmas(3))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        S.sample_euler(gaussian, torch.ones(2, 12, dtype=torch.int64), S.karras_sigmas(3))
    with pytest.raises(ValueError, match="eta"):
        S.sample_ddim(gaussian, _x(), S.karras_sigmas(3), eta=-1.0)
    with pytest.raises(ValueError, match="s_churn"):
        S.sample_heun(gaussian, _x(), S.karras_sigmas(3), s_churn=-1.0)
    with pytest.raises(TypeError, match="generator"):
        S.sample_ddim(gaussian, _x(), S.karras_sigmas(3), eta=1.0, generator="seed")
    with pytest.raises(ValueError, match="capture: CUDA graphs need CUDA tensors"):
        S.sample_heun(gaussian, _x(), S.karras_sigmas(3), capture=True)
    with pytest.raises(ValueError, match="sigmas: expected strictly ascending"):
        S.invert(gaussian, _x(), S.karras_sigmas(3))
    with pytest.raises(ValueError, match="eta: inversion is deterministic"):
        S.invert(gaussian, _x(), solver="ddim", eta=1.0)


def test_progress_bar(gaussian, monkeypatch):
    monkeypatch.setenv("DIFFCORE_PROGRESS", "1")
    x = _x()
    with_bar = S.sample_euler(gaussian, x, S.karras_sigmas(3), progress=True)
    assert torch.equal(with_bar, S.sample_euler(gaussian, x, S.karras_sigmas(3)))


def _static_output(denoiser):
    """``denoiser`` writing every output into one tensor (e.g. a CUDA-graph-captured network)."""
    buffer = {}

    def static_output(x, s):
        out = buffer.setdefault("out", torch.empty_like(x))
        return out.copy_(denoiser(x, s))

    return static_output


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
def test_denoiser_reusing_its_output_buffer_is_an_error(solver, gaussian):
    with pytest.raises(ValueError, match="same output buffer"):
        S.SOLVERS[solver](_static_output(gaussian), _x(), S.karras_sigmas(5))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("solver", ["euler", "ddim"])
def test_one_step_solvers_accept_a_denoiser_reusing_its_output_buffer(solver, backend, gaussian):
    """Euler and DDIM read only the current step's output (no c_extra term): a static buffer is fine."""
    x, sigmas = _x(), S.karras_sigmas(5)
    expected = S.SOLVERS[solver](gaussian, x, sigmas, backend=backend)
    assert torch.equal(S.SOLVERS[solver](_static_output(gaussian), x, sigmas, backend=backend), expected)


@pytest.mark.parametrize("solver", list(S.SOLVERS))
def test_denoiser_returning_its_input(solver):
    """D(x) = x (returned as the same tensor) must not be corrupted by the in-place update."""
    x = _x()
    out = S.SOLVERS[solver](lambda xx, s: xx, x, S.karras_sigmas(5))
    torch.testing.assert_close(out, x)


def test_seeds_cover_the_32_bit_range_and_larger_ones_are_refused():
    """torch's CPU generator keeps 32 bits of a seed: 2**32 + 7 would silently equal 7 (issue 18, item 8)."""
    from diffcore.sampler import noise_from_seeds

    top = noise_from_seeds([2**32 - 1, 2**31 - 1, 0], (4,), dtype=torch.float64)
    assert not torch.equal(top[0], top[1]) and not torch.equal(top[0], top[2])
    for seed in (2**32, 2**32 + 7, 2**63, 2**64, -1):
        with pytest.raises(ValueError, match=r"seeds: expected non-negative integers below 2\*\*32.*seeds\[1\]"):
            noise_from_seeds([3, seed], (4,))
