"""The MoLRG study (issue 8): the learnable-subspace denoiser recovers the subspaces with enough
samples, the recovery error falls as N/d grows, and the tiny preset writes its outputs."""
from __future__ import annotations

import json

import pytest
import torch

from diffcore import _env

from diffcore.data import molrg, molrg_bases
from diffcore.denoisers import MoLRGDenoiser
from diffcore import analysis
from diffcore.experiments import _vector
from diffcore.models import vector
from diffcore.experiments import molrg as study


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("molrg")
    return out, study.run_preset("tiny", out, progress=False)


def test_subspace_denoiser_is_the_molrg_denoiser_at_the_true_bases():
    bases = molrg_bases(2, 12, 3, seed=0)
    model = vector.SubspaceDenoiser(2, 12, 3)
    with torch.no_grad():
        model.raw.copy_(bases.float())
    x = torch.randn(7, 12)
    sigma = torch.tensor([0.1, 0.5, 1, 2, 4, 8, 0.05])
    torch.testing.assert_close(model(x, sigma).double(), MoLRGDenoiser(bases)(x.double(), sigma), atol=1e-5, rtol=1e-5)


def test_subspace_training_recovers_the_subspaces_with_enough_samples():
    with _env.torch_threads(1):
        data, _, bases = molrg(2, 16, 2, 64, seed=3)
        model, info = _vector.train_subspace_denoiser(data, 2, 2, restarts=3, seed=0, steps=400, lr=3e-2,
                                                      P_mean=-0.5, P_std=1.0, sigma_data=_vector.data_sigma(data))
    rec = analysis.subspace_recovery(model.bases().detach(), bases)
    assert rec.error < 1e-2 and rec.max_angle_deg < 5, (rec, info)
    assert sorted(rec.permutation) == [0, 1]


def test_subspace_recovery_and_union_distance_on_known_inputs():
    bases = molrg_bases(3, 10, 2, seed=1)
    rec = analysis.subspace_recovery(bases[[2, 0, 1]], bases)
    assert rec.error < 1e-12 and rec.max_angle_deg < 1e-4 and rec.permutation == [1, 2, 0]
    other = molrg_bases(3, 10, 2, seed=2)
    assert analysis.subspace_recovery(other, bases).error > 0.1
    on = torch.einsum("nd,bd->bn", bases[1], torch.randn(5, 2, dtype=torch.float64))
    assert float(analysis.distance_to_union(on, bases).max()) < 1e-12
    direction = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))[0][:, :1].T
    off = on + 0.5 * direction * on.norm(dim=1, keepdim=True)
    assert float(analysis.distance_to_union(off, bases).min()) > 0.05


def test_tiny_run_recovery_error_falls_with_n_over_d(tiny_run):
    out, results = tiny_run
    sub = sorted((r["ratio"], r["recovery_error"]) for r in results["runs"] if r["model"] == "subspace")
    assert sub[0][1] > 0.3          # N < K d: the bases cannot be determined
    assert sub[-1][1] < 0.05        # N/d = 8: recovered
    assert sub[-1][1] < sub[0][1]
    large = [r for r in results["runs"] if r["model"] == "subspace" and r["ratio"] == sub[-1][0]][0]
    assert large["on_union"] > 0.8  # its samples lie on the true union


def test_tiny_run_outputs_and_rank(tiny_run):
    out, results = tiny_run
    for name in ("results.json", "runs.csv", "phase_transition.png", "rank.png", "timings.json"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text()) == results
    true_rank = results["rank"]["curves"]["true MoLRG"]
    # at small sigma the true denoiser's Jacobian is a projection on one d-dim subspace
    assert true_rank[-1] == results["rank"]["d"]


def test_rerun_reuses_every_unit(tiny_run):
    out, results = tiny_run
    again = study.run_preset("tiny", out, progress=False)
    assert again == results
    timings = json.loads((out / "timings.json").read_text())
    assert sum(kind["reused"] for kind in timings["units"].values()) == len(results["runs"])
