"""The pure ZO core against functions with known gradients and straightforward reference code."""
import numpy as np
import pytest

from zo_runtime import zo

D = 64
A = np.diag(np.linspace(0.5, 2.0, D))          # quadratic f(x) = x^T A x / 2, grad = A x
X = np.random.default_rng(123).standard_normal(D).astype(np.float32)


def quad(y):
    y = y.astype(np.float64)
    return 0.5 * float(y @ A @ y)


def estimates(cfg, seeds=300):
    out = []
    for s in range(seeds):
        losses = [quad(p) for p in zo.query_points(X, s, 1, cfg)]
        out.append(zo.estimate(losses, s, 1, D, cfg))
    return np.array(out)


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("estimator", ["rge", "spsa"])
@pytest.mark.parametrize("n", [1, 2, 8])
def test_estimator_cosine_and_bias(estimator, n):
    cfg = zo.ZOConfig(queries=n, mu=1e-4, estimator=estimator)
    true = A @ X
    gs = estimates(cfg)
    mean_cos = np.mean([cos(g, true) for g in gs])
    expect = np.sqrt(n / (D + n - 1))
    # E[cos] of averaged random projections: a bit under sqrt(n/(D+n-1)) (exactly sqrt(2/(pi D)) for n=1).
    assert 0.7 * expect < mean_cos < 1.05 * expect, (mean_cos, expect)
    # Unbiased up to the reference's scale: mean * sqrt((D+n-1)/n) ~ true gradient.
    mean = gs.mean(axis=0) * np.sqrt((D + n - 1) / n)
    assert cos(mean, true) > 0.8
    # Component along the true gradient ~ 1 (its Monte-Carlo std is about sqrt(2 / (n * 300)) <= 0.08).
    assert 0.75 < mean @ true / (true @ true) < 1.25
    # The scale also keeps each estimate's norm near the true gradient's.
    assert 0.7 < np.mean(np.linalg.norm(gs, axis=1)) / np.linalg.norm(true) < 1.1


def test_rge_matches_formula_exactly_on_linear_function():
    c = np.random.default_rng(5).standard_normal(D)
    cfg = zo.ZOConfig(queries=3, mu=1e-3)
    pts = zo.query_points(X, 7, 11, cfg)
    losses = pts.astype(np.float64) @ c
    zs = [zo.direction(7, 11, i, D).astype(np.float64) for i in range(3)]
    assert np.allclose(pts[0], X) and np.allclose(pts[1:], X + 1e-3 * np.array(zs), atol=1e-7)
    gi = [(losses[i + 1] - losses[0]) / 1e-3 for i in range(3)]
    want = sum(g * z for g, z in zip(gi, zs)) / (3 * np.sqrt((D + 2) / 3))
    assert np.allclose(zo.estimate(losses, 7, 11, D, cfg), want, rtol=1e-5, atol=1e-6)
    # With r projected dims the reference scales by D - r.
    want_p = want * np.sqrt((D + 2) / 3) / np.sqrt((D - 10 + 2) / 3)
    assert np.allclose(zo.estimate(losses, 7, 11, D, cfg, projected=10), want_p, rtol=1e-5, atol=1e-6)


def test_orthogonal_directions_sweep_an_orthonormal_basis():
    """One sweep (D/n steps) probes D orthogonal directions of norm sqrt(D); the next sweep is a new basis."""
    d, n = 16, 2
    cfg = zo.ZOConfig(queries=n, directions="orthogonal")
    sweep = np.array([zo.direction(3, step, i, d, cfg) for step in range(1, d // n + 1) for i in range(n)], np.float64)
    assert np.allclose(sweep @ sweep.T, d * np.eye(d), atol=1e-4)
    nxt = np.array([zo.direction(3, d // n + 1, i, d, cfg) for i in range(n)], np.float64)
    assert np.abs(nxt @ sweep.T).max() < d                       # not a row of the first basis again
    assert np.allclose(zo.direction(3, 2, 1, d, cfg), sweep[3])    # regenerated from (seed, step, i) alone
    # The sum over a sweep of (g.z) z / D is exactly g: the estimator is exact on a linear function per sweep.
    g = np.random.default_rng(1).standard_normal(d)
    assert np.allclose(sum((g @ z) * z for z in sweep) / d, g, atol=1e-6)
    with pytest.raises(ValueError, match="directions"):
        zo.ZOConfig(directions="sobol")


def test_vocab_prior_is_the_square_root_of_the_mixed_covariance():
    """A A = (1 - mix) C + mix I with C scaled to trace d; directions then have that covariance."""
    d = 8
    rows = np.random.default_rng(2).standard_normal((500, d)) * np.linspace(0.1, 3.0, d)   # anisotropic words
    a = zo.prior_sqrt(rows, 0.2).astype(np.float64)
    c = np.cov(rows.T)
    want = 0.8 * c * d / np.trace(c) + 0.2 * np.eye(d)
    assert np.allclose(a, a.T, atol=1e-6) and np.allclose(a @ a, want, atol=1e-5)
    # Chunked statistics equal the one-shot ones on a table longer than one 4096-row slice.
    big = np.random.default_rng(3).standard_normal((9000, d)).astype(np.float32) * np.arange(1, d + 1)
    cb = np.cov(big.T.astype(np.float64))
    assert np.allclose(zo.prior_sqrt(big, 0.0) @ zo.prior_sqrt(big, 0.0), cb * d / np.trace(cb), atol=1e-4)
    cfg = zo.ZOConfig(directions="vocab")
    zs = np.array([zo.direction(1, s, 0, 2 * d, cfg, a) for s in range(1, 4001)], np.float64)   # 2 vectors
    for block in (zs[:, :d], zs[:, d:]):                       # each vector of the token gets the same prior
        assert np.allclose(np.cov(block.T), want, atol=0.15)
    with pytest.raises(ValueError, match="prior"):
        zo.direction(1, 1, 0, d, cfg)
    with pytest.raises(ValueError, match="mix"):
        zo.prior_sqrt(rows, 1.5)


def test_vocab_estimate_is_the_preconditioned_gradient():
    """E[g] is proportional to S grad (not grad): steps favour the directions words span."""
    cfg = zo.ZOConfig(queries=2, mu=1e-4, directions="vocab")
    prior = zo.prior_sqrt(np.random.default_rng(4).standard_normal((300, D)) * np.linspace(0.2, 2.0, D), 0.1)
    gs = []
    for s in range(2000):
        losses = [quad(p) for p in zo.query_points(X, s, 1, cfg, prior=prior)]
        gs.append(zo.estimate(losses, s, 1, D, cfg, prior=prior))
    want = prior.astype(np.float64) @ prior @ (A @ X)
    assert cos(np.mean(gs, axis=0), want) > 0.95
    assert cos(np.mean(gs, axis=0), A @ X) < cos(np.mean(gs, axis=0), want) - 0.02


def test_cosine_lr_schedule():
    cfg = zo.ZOConfig(lr=0.02, lr_schedule="cosine", lr_final=0.1, horizon=100)
    assert zo.lr_at(cfg, 1) == pytest.approx(0.02)
    assert zo.lr_at(cfg, 51) == pytest.approx(0.02 * (0.1 + 0.9 * 0.5))
    assert zo.lr_at(cfg, 101) == pytest.approx(0.002) and zo.lr_at(cfg, 500) == pytest.approx(0.002)
    assert all(zo.lr_at(cfg, s) >= zo.lr_at(cfg, s + 1) for s in range(1, 120))
    assert zo.lr_at(zo.ZOConfig(lr=0.02), 10_000) == 0.02          # constant: the reference
    # The same update at step 101 is a tenth of the constant-lr one.
    moves = []
    for c in (cfg, zo.ZOConfig(lr=0.02)):
        st = zo.ZOState.start(np.zeros(4), c)
        st.step = 100
        zo.adam_update(st, np.ones(4, np.float32), c)
        moves.append(st.v)
    assert np.allclose(moves[0], 0.1 * moves[1], rtol=1e-5) and moves[1][0] < 0
    with pytest.raises(ValueError, match="horizon"):
        zo.ZOConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="lr_schedule"):
        zo.ZOConfig(lr_schedule="step")


def test_averaged_result_is_the_bias_corrected_ema_and_survives_a_checkpoint():
    cfg = zo.ZOConfig(queries=1, tau=4, average=0.9, subspace=False)
    st = zo.ZOState.start(np.zeros(3), cfg)
    assert np.array_equal(zo.result(st, cfg), st.v)                      # nothing averaged yet
    seen = []
    for k in range(1, 6):
        zo.update(st, np.array([0.0, 1e-3 * k]), seed=k, cfg=cfg)
        seen.append(st.v.copy())
    w = 0.9 ** np.arange(4, -1, -1) * 0.1
    assert np.allclose(zo.result(st, cfg), (w[:, None] * seen).sum(0) / w.sum(), atol=1e-7)
    assert not np.allclose(zo.result(st, cfg), st.v)
    back = zo.ZOState.from_arrays(st.arrays())
    assert np.array_equal(zo.result(back, cfg), zo.result(st, cfg))
    old = {k: v for k, v in st.arrays().items() if k != "avg"}             # a checkpoint from before averaging
    assert np.array_equal(zo.ZOState.from_arrays(old).avg, np.zeros(3, np.float32))
    assert np.array_equal(zo.result(st, zo.ZOConfig()), st.v)             # average=0: the last iterate
    with pytest.raises(ValueError, match="average"):
        zo.ZOConfig(average=1.0)


def test_spsa_uses_two_passes_per_query():
    cfg = zo.ZOConfig(queries=2, mu=1e-2, estimator="spsa")
    pts = zo.query_points(X, 0, 1, cfg)
    assert pts.shape == (4, D) and cfg.passes == 4
    assert np.allclose((pts[0] + pts[1]) / 2, X, atol=1e-6)


def test_adam_matches_reference_implementation():
    cfg = zo.ZOConfig(lr=1e-2)
    rng = np.random.default_rng(0)
    state = zo.ZOState.start(X, cfg)
    v, m, s = X.astype(np.float64), np.zeros(D), np.zeros(D)
    for t in range(1, 21):
        g = rng.standard_normal(D).astype(np.float32)
        zo.adam_update(state, g, cfg)
        state.step = t
        m = 0.9 * m + 0.1 * g
        s = 0.999 * s + 0.001 * g.astype(np.float64) ** 2
        v = v - 1e-2 * (m / (1 - 0.9 ** t)) / (np.sqrt(s / (1 - 0.999 ** t)) + 1e-3)
    assert np.allclose(state.v, v, atol=1e-5)
    assert np.allclose(state.m, m, atol=1e-6) and np.allclose(state.s, s, atol=1e-7)


def test_subspace_basis_matches_reference_pca():
    rng = np.random.default_rng(1)
    # History with 3 strong directions plus weak noise: the basis is everything but those.
    hist = (rng.standard_normal((32, 3)) @ rng.standard_normal((3, D)) * 5
            + 1e-4 * rng.standard_normal((32, D))).astype(np.float32)
    basis = zo.subspace_basis(hist, nu=1e-3)
    x = (hist - hist.mean(0)) / hist.std(0)
    _, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    cum = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = int(np.argmax(cum > 1 - 1e-3))
    assert basis.shape == (32 - k - 1, D)
    assert np.allclose(np.abs(basis @ vt[k + 1:].T), np.eye(basis.shape[0]), atol=1e-4)


def test_subspace_cap_keeps_sd_reference_and_bounds_small_models():
    """tau=128 on D=768 (SD 1.5) is never capped; on D=128 the cap keeps >= 83% of the dims free."""
    rng = np.random.default_rng(3)
    for d, want_uncapped in ((768, True), (128, False)):
        hist = (rng.standard_normal((128, 2)) @ rng.standard_normal((2, d)) * 5
                + 1e-4 * rng.standard_normal((128, d))).astype(np.float32)   # 2 strong directions: drift-like
        full = zo.subspace_basis(hist, nu=1e-3)
        capped = zo.subspace_basis(hist, nu=1e-3, cap=zo.ZOConfig().subspace_cap)
        assert full.shape[0] >= 120                                  # the reference rule removes ~all history dims
        assert (capped.shape == full.shape) == want_uncapped
        assert capped.shape[0] <= int(0.17 * d)
        assert np.allclose(capped, full[len(full) - len(capped):])   # the cap keeps the lowest-variance rows


def test_project_removes_exactly_the_chosen_directions():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    basis = q[:, :5].T.astype(np.float32)           # (5, D) orthonormal rows
    keep = q[:, 5:].T
    g = rng.standard_normal(D).astype(np.float32)
    p = zo.project(g, basis)
    assert np.allclose(basis @ p, 0, atol=1e-5)                  # chosen directions gone
    assert np.allclose(keep @ p, keep @ g, atol=1e-5)            # everything else untouched
    assert np.array_equal(zo.project(g, np.zeros((0, D), np.float32)), g)


def test_subspace_does_nothing_during_first_tau_steps():
    cfg_on = zo.ZOConfig(tau=8, lr=1e-2)
    cfg_off = zo.ZOConfig(tau=8, lr=1e-2, subspace=False)
    on, off = zo.ZOState.start(X, cfg_on), zo.ZOState.start(X, cfg_off)
    for step in range(1, 9):
        losses = [quad(p) for p in zo.query_points(on.v, 0, step, cfg_on)]
        g_on = zo.update(on, losses, 0, cfg_on)
        g_off = zo.update(off, losses, 0, cfg_off)
        assert np.array_equal(g_on, g_off) and np.array_equal(on.v, off.v)
    assert on.basis.shape[0] > 0 and off.basis.shape[0] == 0      # refreshed at step tau
    assert np.array_equal(on.history[-1], on.v)
    losses = [quad(p) for p in zo.query_points(on.v, 0, 9, cfg_on)]
    g = zo.update(on, losses, 0, cfg_on)
    assert np.allclose(on.basis @ g, 0, atol=1e-5)


def test_puts_range_and_uniformity():
    ts = [zo.sample_timestep(zo.step_rng(0, s), 500, 900) for s in range(4000)]
    assert min(ts) == 500 and max(ts) == 899
    assert abs(np.mean(ts) - 699.5) < 6


def test_same_seed_same_result_and_loss_falls():
    cfg = zo.ZOConfig(tau=16, lr=3e-2)

    def run(seed):
        state = zo.ZOState.start(X, cfg)
        for _ in range(200):
            losses = [quad(p) for p in zo.query_points(state.v, seed, state.step + 1, cfg)]
            zo.update(state, losses, seed, cfg)
        return state

    a, b, c = run(0), run(0), run(1)
    assert np.array_equal(a.v, b.v) and np.array_equal(a.basis, b.basis)
    assert not np.array_equal(a.v, c.v)
    assert quad(a.v) < 0.5 * quad(X)


def test_state_roundtrip_and_config_validation():
    cfg = zo.ZOConfig()
    st = zo.ZOState.start(X, cfg)
    back = zo.ZOState.from_arrays(st.arrays())
    assert all(np.array_equal(getattr(st, k), getattr(back, k)) for k in ("v", "m", "s", "history", "basis"))
    for bad in ({"queries": 0}, {"mu": 0}, {"estimator": "x"}, {"tau": 1}, {"nu": 1.5}, {"lr": -1}):
        with pytest.raises(ValueError):
            zo.ZOConfig(**bad)


def test_jacobian_moment_matches_a_known_linear_encoder():
    """A linear 'text encoder' out = tanh-free emb @ W: J^T J is |positions| W W^T for every vector."""
    from types import SimpleNamespace as NS

    from zo_runtime import priors

    rng = np.random.default_rng(0)
    d, e, L = 6, 5, 9
    W = rng.standard_normal((d, e))
    text = NS(encode_embeds=lambda emb: emb.astype(np.float64) @ W)        # (b, L, d) -> (b, L, e)
    base = rng.standard_normal((L, d)).astype(np.float32)
    v0 = rng.standard_normal((2, d)).astype(np.float32)
    prompts = [(base, [np.array([2]), np.array([4, 5])]), (base, [np.array([7]), np.array([1])])]
    m = priors.jacobian_moment(text, prompts, v0, batch=4)                   # batch 4 < d: a short last call
    assert np.allclose(m, (1 + 2 + 1 + 1) * W @ W.T, rtol=1e-3, atol=1e-3)
    a = zo.prior_from_moment(m, 0.25).astype(np.float64)
    assert np.allclose(a, a.T, atol=1e-5)
    assert np.allclose(a @ a, 0.75 * m * d / np.trace(m) + 0.25 * np.eye(d), atol=1e-4)


def test_a_negative_prior_power_puts_the_queries_in_the_flat_directions():
    """power -1: z ~ N(0, S^-1) scaled to trace d (Gauss-Newton through the text encoder)."""
    d = 5
    m = np.diag([100.0, 10.0, 1.0, 0.1, 0.0])
    s = 0.9 * m * d / np.trace(m) + 0.1 * np.eye(d)
    for power in (-1.0, -0.5):
        a = zo.prior_from_moment(m, 0.1, power).astype(np.float64)
        want = np.diag(np.diag(s) ** power)
        assert np.allclose(a @ a, want * d / np.trace(want), atol=1e-5)
    a = zo.prior_from_moment(m, 0.1, -1.0)
    assert a[4, 4] > a[0, 0] * 6                        # the dim the encoder ignores: sqrt(10 / 0.24) = 6.4x the stiff one
    with pytest.raises(ValueError, match="prior mix > 0"):
        zo.prior_from_moment(m, 0.0, -1.0)


def test_guided_directions_lean_on_the_momentum_and_are_regenerated_exactly():
    D, s = 16, 0.5
    cfg = zo.ZOConfig(directions="guided", guide_share=s, subspace=False)
    guide = np.zeros(D, np.float32)
    guide[3] = 2.0
    zs = np.stack([zo.direction(7, t, 0, D, cfg, guide=guide) for t in range(1, 4001)]).astype(np.float64)
    cov = zs.T @ zs / len(zs)
    want = (1 - s) * np.eye(D)
    want[3, 3] += s * D
    assert np.allclose(cov, want, atol=0.35)                      # 4000 draws: ~0.1 off per entry
    assert np.isclose(np.trace(cov), D, rtol=0.05)
    assert np.array_equal(zo.direction(7, 1, 0, D, cfg, guide=np.zeros(D)),      # no momentum yet: gaussian
                          zo.direction(7, 1, 0, D, zo.ZOConfig()))
    # update() regenerates the queries from state.m: the applied gradient is sum_i c_i z_i / norm
    a = np.random.default_rng(1).standard_normal(D)
    state = zo.ZOState.start(np.zeros(D), cfg)
    state.m[:] = guide
    pts = zo.query_points(state.v, 7, 1, cfg, guide=state.m)
    losses = pts.astype(np.float64) @ a
    zs = [zo.direction(7, 1, i, D, cfg, guide=guide) for i in range(cfg.queries)]
    want = sum((l - losses[0]) / cfg.mu * z for l, z in zip(losses[1:], zs)) / (2 * np.sqrt((D + 1) / 2))
    assert np.allclose(zo.update(state, losses, 7, cfg), want, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="guide_share"):
        zo.ZOConfig(guide_share=1.0)


def test_global_normalization_keeps_the_step_direction():
    """normalize='global': one second moment, so the first step is -lr g / (rms(g) + eps), parallel to g."""
    g = np.array([3.0, -1.0, 0.5, 0.0], np.float32)
    for norm, want in (("global", -0.1 * g / (np.sqrt(np.mean(g * g)) + 1e-3)),
                       ("coordinate", -0.1 * g / (np.abs(g) + 1e-3))):
        cfg = zo.ZOConfig(lr=0.1, normalize=norm)
        state = zo.ZOState.start(np.zeros(4), cfg)
        zo.adam_update(state, g, cfg)
        assert np.allclose(state.v, want, rtol=1e-4)
    with pytest.raises(ValueError, match="normalize"):
        zo.ZOConfig(normalize="layer")


def test_a_rank_k_prior_spreads_queries_evenly_over_the_top_k_and_the_estimate_divides_by_its_span():
    d, k, mix, n = 12, 3, 0.1, 2
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    m = (q * np.arange(d, 0, -1.0) ** 3) @ q.T                     # top-3 eigen-directions = q[:, :3]
    a = zo.prior_from_moment(m, mix, rank=k).astype(np.float64)
    p = q[:, :k] @ q[:, :k].T
    assert np.allclose(a @ a, p + mix * (np.eye(d) - p), atol=1e-5)     # equal weight, not m's spread
    cfg = zo.ZOConfig(directions="jacobian", queries=n)
    losses = np.array([1.0, 1.5, 0.25])
    g = zo.estimate(losses, 3, 1, d, cfg, projected=4, prior=a.astype(np.float32))
    span = (k + mix * (d - k)) * (1 - 4 / d)
    want = sum(c * zo.direction(3, 1, i, d, cfg, a.astype(np.float32)) for i, c in enumerate((losses[1:] - 1) / cfg.mu))
    assert np.allclose(g, want / (n * np.sqrt((span + n - 1) / n)), rtol=1e-4)
