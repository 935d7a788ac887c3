"""The pure ZO core against functions with known gradients and straightforward reference code."""
import numpy as np
import pytest

from zo_runtime import zo

D = 64
A = np.diag(np.linspace(0.5, 2.0, D))          # quadratic f(x) = x^T A x / 2, grad = A x
X = np.random.default_rng(123).standard_normal(D).astype(np.float32)
GAUSS = zo.Gaussian()


def quad(y):
    y = y.astype(np.float64)
    return 0.5 * float(y @ A @ y)


def estimates(cfg, seeds=300):
    out = []
    for s in range(seeds):
        losses = [quad(p) for p in zo.query_points(X, s, 1, cfg, GAUSS)]
        out.append(zo.estimate(losses, s, 1, D, cfg, GAUSS))
    return np.array(out)


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("n", [1, 2, 8])
def test_estimator_cosine_and_bias(n):
    cfg = zo.ZOConfig(queries=n, mu=1e-4)
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
    pts = zo.query_points(X, 7, 11, cfg, GAUSS)
    losses = pts.astype(np.float64) @ c
    zs = [GAUSS.draw(7, 11, i, D).astype(np.float64) for i in range(3)]
    assert np.allclose(pts[0], X) and np.allclose(pts[1:], X + 1e-3 * np.array(zs), atol=1e-7)
    gi = [(losses[i + 1] - losses[0]) / 1e-3 for i in range(3)]
    want = sum(g * z for g, z in zip(gi, zs)) / (3 * np.sqrt((D + 2) / 3))
    assert np.allclose(zo.estimate(losses, 7, 11, D, cfg, GAUSS), want, rtol=1e-5, atol=1e-6)
    # With r projected dims the reference scales by D - r.
    want_p = want * np.sqrt((D + 2) / 3) / np.sqrt((D - 10 + 2) / 3)
    assert np.allclose(zo.estimate(losses, 7, 11, D, cfg, GAUSS, projected=10), want_p, rtol=1e-5, atol=1e-6)


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
        losses = [quad(p) for p in zo.query_points(on.v, 0, step, cfg_on, GAUSS)]
        g_on = zo.update(on, losses, 0, cfg_on, GAUSS)
        g_off = zo.update(off, losses, 0, cfg_off, GAUSS)
        assert np.array_equal(g_on, g_off) and np.array_equal(on.v, off.v)
    assert on.basis.shape[0] > 0 and off.basis.shape[0] == 0      # refreshed at step tau
    assert np.array_equal(on.history[-1], on.v)
    losses = [quad(p) for p in zo.query_points(on.v, 0, 9, cfg_on, GAUSS)]
    g = zo.update(on, losses, 0, cfg_on, GAUSS)
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
            losses = [quad(p) for p in zo.query_points(state.v, seed, state.step + 1, cfg, GAUSS)]
            zo.update(state, losses, seed, cfg, GAUSS)
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
    for bad in ({"queries": 0}, {"mu": 0}, {"tau": 1}, {"nu": 1.5}, {"lr": -1}, {"betas": (0.9, 1.0)}):
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


def test_a_rank_k_prior_spreads_queries_evenly_over_the_top_k_and_the_estimate_divides_by_its_span():
    d, k, mix, n = 12, 3, 0.1, 2
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    m = (q * np.arange(d, 0, -1.0) ** 3) @ q.T                     # top-3 eigen-directions = q[:, :3]
    a = zo.top_k_sqrt(m, k, mix).astype(np.float64)
    p = q[:, :k] @ q[:, :k].T
    assert np.allclose(a @ a, p + mix * (np.eye(d) - p), atol=1e-5)     # equal weight, not m's spread
    dirs = zo.Shaped(a.astype(np.float32))
    cfg = zo.ZOConfig(queries=n)
    losses = np.array([1.0, 1.5, 0.25])
    g = zo.estimate(losses, 3, 1, d, cfg, dirs, projected=4)
    span = (k + mix * (d - k)) * (1 - 4 / d)
    want = sum(c * dirs.draw(3, 1, i, d) for i, c in enumerate((losses[1:] - 1) / cfg.mu))
    assert np.allclose(g, want / (n * np.sqrt((span + n - 1) / n)), rtol=1e-4)
    # z = g A per vector: each of a 2-vector token's halves has covariance A A
    zs = np.array([dirs.draw(1, s, 0, 2 * d) for s in range(1, 4001)], np.float64)
    for block in (zs[:, :d], zs[:, d:]):
        assert np.allclose(np.cov(block.T), a @ a, atol=0.12)
    assert np.array_equal(GAUSS.draw(1, 2, 0, d) @ a.astype(np.float32), dirs.draw(1, 2, 0, d))
