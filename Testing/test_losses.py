"""Shared dissimilarities, regularisers and penalties: hand-computed values and invariances."""

import numpy as np
import pytest
import torch
from DeepLungRegLib import losses as L
from DeepLungRegLib.metrics import jacobian_determinant as jacobian_numpy
from scipy.spatial.transform import Rotation


def texture(shape=(12, 14, 16), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *shape), generator=g, dtype=torch.float64)
    return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1)


def test_masked_ssd_hand_value_and_mask():
    a = torch.zeros(1, 1, 1, 1, 4, dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=torch.float64).view(1, 1, 1, 1, 4)
    assert float(L.masked_ssd(a, b)) == pytest.approx((1 + 4 + 0 + 9) / 4)
    mask = torch.tensor([1, 1, 0, 0]).view(1, 1, 1, 1, 4)
    assert float(L.masked_ssd(a, b, mask)) == pytest.approx((1 + 4) / 2)
    assert float(L.masked_ssd(a, b, torch.zeros_like(mask))) == pytest.approx(14 / 4)  # empty -> all


def test_local_ncc_of_an_image_with_itself_and_an_affine_copy():
    a = 10.0 * texture()  # local variance well above the stabilising epsilon
    assert float(L.local_ncc(a, a, window=5)) == pytest.approx(-1.0, abs=1e-3)
    assert float(L.local_ncc(a, 3.0 * a - 7.0, window=5)) == pytest.approx(-1.0, abs=1e-3)
    assert float(L.local_ncc(a, 10.0 * texture(seed=1), window=5)) > -0.5


def test_ngf_hand_value_parallel_edges_and_intensity_scaling():
    # a ramp along i: gradient (1, 0, 0) per mm; its copy along j: orthogonal gradients
    k, j, i = np.meshgrid(np.arange(5.0), np.arange(6.0), np.arange(7.0), indexing="ij")
    a = torch.from_numpy(i)[None, None]
    b = torch.from_numpy(j)[None, None]
    eps = 0.1
    e2 = 3 * eps**2
    # per voxel: 1 - (0 + e2)^2 / ((1 + e2)(1 + e2))
    assert float(L.ngf(a, b, eps)) == pytest.approx(1 - e2**2 / (1 + e2) ** 2)
    assert float(L.ngf(a, a, eps)) == pytest.approx(0.0, abs=1e-12)
    t = texture()
    tiny = 1e-6
    assert float(L.ngf(t, 5.0 * t + 2.0, tiny)) == pytest.approx(0.0, abs=1e-6)        # contrast-invariant
    other = texture(seed=3)
    assert float(L.ngf(t, 5.0 * other, tiny)) == pytest.approx(float(L.ngf(t, other, tiny)), abs=1e-6)
    assert float(L.ngf(4.0 * t, 4.0 * other, 4.0 * 0.05)) == pytest.approx(float(L.ngf(t, other, 0.05)), rel=1e-9)
    # spacing: the same ramp on 2 mm voxels has half the gradient
    assert float(L.ngf(a, b, eps, spacing=(2.0, 2.0, 2.0))) != pytest.approx(float(L.ngf(a, b, eps)))


def test_mind_features_shape_range_and_intensity_invariance():
    t = texture(shape=(10, 11, 12))
    f = L.mind_features(t)
    assert f.shape == (1, 6, 10, 11, 12)
    assert float(f.min()) >= 0.0 and float(f.max()) == pytest.approx(1.0)
    assert torch.allclose(L.mind_features(3.0 * t + 100.0), f, atol=1e-6)
    assert float((L.mind_features(texture(shape=(10, 11, 12), seed=5)) - f).abs().mean()) > 0.05


def _field(fn, shape=(6, 7, 8), spacing=(1.0, 1.0, 1.0)):
    """(1, 3, D, H, W) field with components fn(x, y, z) at physical node positions."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    x, y, z = i * spacing[0], j * spacing[1], k * spacing[2]
    return torch.from_numpy(np.stack(fn(x, y, z)))[None]


def test_regularisers_vanish_where_they_must_and_match_hand_values():
    sp = (0.5, 2.0, 3.0)
    trans = _field(lambda x, y, z: (np.full_like(x, 3.0), np.full_like(x, -1.0), np.full_like(x, 2.0)), spacing=sp)
    aff = _field(lambda x, y, z: (0.1 * x + 0.2 * y - 0.05 * z + 1, 0.3 * z, -0.2 * x), spacing=sp)
    assert float(L.diffusion(trans, sp)) == pytest.approx(0.0, abs=1e-12)
    assert float(L.curvature(aff, sp)) == pytest.approx(0.0, abs=1e-10)
    # u_x = a x: |grad u|^2 = a^2 everywhere
    lin = _field(lambda x, y, z: (0.3 * x, 0 * x, 0 * x), spacing=sp)
    assert float(L.diffusion(lin, sp)) == pytest.approx(0.09)
    # u_z = y^2: Laplacian = 2 -> (Δu)^2 = 4
    quad = _field(lambda x, y, z: (0 * x, 0 * x, y**2), spacing=sp)
    assert float(L.curvature(quad, sp)) == pytest.approx(4.0)
    assert float(L.diffusion(aff, sp)) > 0.0


def test_volume_change_penalty_values_symmetry_and_barrier():
    t = 0.2
    z = torch.tensor([1.0, 2.0, 0.5, t, 0.0, -1.0]).view(1, 1, 1, 1, 6)
    vals = [float(L.volume_change_penalty(z[..., n:n + 1], t)) for n in range(6)]
    assert vals[0] == 0.0
    assert vals[1] == pytest.approx(0.5) and vals[2] == pytest.approx(0.5)          # ψ(z) = ψ(1/z)
    assert vals[3] == pytest.approx((t - 1) ** 2 / t)
    assert vals[4] == pytest.approx(2 * (1 - t) / t)                                 # finite at folding
    assert vals[5] > vals[4] > vals[3]                                                # grows past the barrier
    below = torch.tensor([t - 1e-6]).view(1, 1, 1, 1, 1)
    assert float(L.volume_change_penalty(below, t)) == pytest.approx(vals[3], rel=1e-4)  # continuous at t
    zz = torch.tensor([-0.5], requires_grad=True)
    L.volume_change_penalty(zz.view(1, 1, 1, 1, 1), t).backward()
    assert float(zz.grad) == pytest.approx(1 - 1 / t**2)                              # linear barrier slope


def test_torch_jacobian_equals_the_numpy_metric_on_an_oblique_grid():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, 7, 8, 9)) * 0.4
    direction = Rotation.from_euler("xyz", [10, -25, 40], degrees=True).as_matrix().ravel()
    spacing = (0.7, 1.1, 2.5)
    ref = jacobian_numpy(u, spacing, direction)
    got = L.jacobian_determinant(torch.from_numpy(u)[None], spacing, direction)[0, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-12)
    # and a known value: u = 0.5 x along x -> det 1.5
    stretch = _field(lambda x, y, z: (0.5 * x, 0 * x, 0 * x), spacing=spacing)
    assert torch.allclose(L.jacobian_determinant(stretch, spacing), torch.tensor(1.5, dtype=torch.float64))


def test_keypoint_loss_hand_value():
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    assert float(L.keypoint_loss(a, b)) == pytest.approx(12.5)
    with pytest.raises(ValueError):
        L.keypoint_loss(a, b[:1])


def test_hand_written_gradients_equal_autograd():
    """The central difference and the diffusion regulariser carry hand-written backward passes
    (speed); their gradients must be those of the plain expressions."""
    import torch
    from DeepLungRegLib import losses as L

    g = torch.Generator().manual_seed(0)
    spacing = (1.5, 2.0, 2.5)
    for shape in [(1, 3, 5, 6, 7), (1, 3, 2, 3, 4), (2, 3, 3, 2, 5)]:
        x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
        for dim in (2, 3, 4):
            if shape[dim] >= 2:
                assert torch.autograd.gradcheck(lambda t, d=dim: L._CentralDifference.apply(t, d), (x,))
        assert torch.autograd.gradcheck(lambda t: L._Diffusion.apply(t, L._spacing_dhw(spacing)), (x,))
        ones = torch.ones(shape[0], 1, *shape[2:], dtype=torch.float64)
        fast, plain = L.diffusion(x, spacing), L.diffusion(x, spacing, mask=ones)   # the mask takes autograd's path
        torch.testing.assert_close(fast, plain)
        gf, = torch.autograd.grad(fast, x)
        gp, = torch.autograd.grad(plain, x)
        torch.testing.assert_close(gf, gp)
        assert gf.abs().max() > 0


def test_diffusion_on_a_single_slice_is_finite_with_and_without_gradients():
    import torch
    from DeepLungRegLib import losses as L

    u = torch.randn(1, 3, 4, 1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain = L.diffusion(u, (1.0, 2.0, 3.0))
    tracked = L.diffusion(u.clone().requires_grad_(True), (1.0, 2.0, 3.0))
    assert torch.isfinite(plain) and plain > 0
    torch.testing.assert_close(plain, tracked.detach())
