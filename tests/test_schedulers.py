"""NumPy schedulers vs diffusers' step by step on the same inputs and noise."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from zo_runtime.schedulers import NoiseSchedule, make_scheduler

# Relative to the largest magnitude of the compared tensor: diffusers works in float32 torch
# (alphas_cumprod in float32), ours in float64 scalars over float32 arrays.
RTOL = 1e-5
# SD 1.5's scheduler_config.json (PNDM, as the hub ships it); DDIM/Euler/DPM are built from it like
# `XScheduler.from_config(pipe.scheduler.config)`.
SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True}
DIFFUSERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler-a": EulerAncestralDiscreteScheduler,
             "dpm++2m": DPMSolverMultistepScheduler}


def _close(ours, ref, what):
    ref = np.asarray(ref, dtype=np.float64)
    err = np.abs(np.asarray(ours, dtype=np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert err < RTOL, f"{what}: relative error {err:.2e} >= {RTOL}"


@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_matches_diffusers_step_by_step(name, prediction, spacing, steps):
    config = {**SD_CONFIG, "prediction_type": prediction}
    if spacing:
        config["timestep_spacing"] = spacing
    ref = DIFFUSERS[name].from_config(config)
    ref.set_timesteps(steps)
    ours = make_scheduler(name, NoiseSchedule.from_config(config), steps)

    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-3)
    _close(ours.init_noise_sigma, float(ref.init_noise_sigma), "init_noise_sigma")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * ours.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        _close(ours.scale_model_input(x, i), ref.scale_model_input(torch.from_numpy(x), t).numpy(), f"scale step {i}")
        out = rng.standard_normal(x.shape).astype(np.float32)            # stands in for the UNet
        gen = torch.Generator().manual_seed(i)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).numpy()   # what diffusers draws
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=gen).prev_sample.numpy()
        got = ours.step(out, i, x, noise=noise)
        assert got.dtype == np.float32
        _close(got, want, f"{name} {prediction} {spacing} step {i}/{steps}")
        x = want                                                         # same inputs for both next step


def test_manifest_overrides_config_and_unknown_names_fail():
    s = NoiseSchedule.from_config({**SD_CONFIG, "prediction_type": "epsilon"}, {"prediction_type": "v_prediction"})
    assert s.prediction_type == "v_prediction" and s.steps_offset == 1
    with pytest.raises(ValueError, match="choose one of"):
        make_scheduler("pndm", s, 10)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(prediction_type="sample")
    with pytest.raises(ValueError, match="steps"):
        make_scheduler("ddim", s, 0)


def test_euler_a_needs_randomness_and_is_seeded():
    s = make_scheduler("euler-a", NoiseSchedule(), 5)
    x = np.ones((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="rng"):
        s.step(x, 0, x)
    a = s.step(x, 0, x, rng=np.random.default_rng(3))
    b = s.step(x, 0, x, rng=np.random.default_rng(3))
    assert np.array_equal(a, b) and not np.array_equal(a, s.step(x, 0, x, rng=np.random.default_rng(4)))
