"""Jacobian, folding and TRE on fields with known answers."""

import numpy as np
import pytest
from conftest import rotation
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.metrics import (
    folding_percent,
    jacobian_determinant,
    std_log_jacobian,
    summarize,
    target_registration_error,
)


def physical_grid(shape, spacing, direction, origin=(3.0, -7.0, 11.0)):
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    idx = np.stack((i, j, k), 0).reshape(3, -1).astype(float)
    m = np.asarray(direction).reshape(3, 3) * np.asarray(spacing)[None, :]
    return (np.asarray(origin)[:, None] + m @ idx).reshape((3,) + shape)


@pytest.mark.parametrize("direction", [np.eye(3).ravel(), rotation(30, 45).ravel()])
def test_uniform_scaling_gives_0729(direction):
    shape, spacing = (10, 12, 14), (0.8, 1.1, 2.5)
    x = physical_grid(shape, spacing, direction)
    d = -0.1 * x  # T(x) = 0.9 x
    det = jacobian_determinant(d, spacing, direction)
    np.testing.assert_allclose(det, 0.729, atol=1e-9)
    assert folding_percent(det) == 0.0


def test_folded_field_is_reported():
    shape, spacing = (8, 8, 8), (1.0, 1.0, 1.0)
    x = physical_grid(shape, spacing, np.eye(3).ravel())
    d = np.zeros_like(x)
    d[0] = -2.0 * x[0]  # T_x = -x: orientation reversed everywhere
    det = jacobian_determinant(d, spacing)
    np.testing.assert_allclose(det, -1.0)
    assert folding_percent(det) == 100.0
    mask = np.zeros(shape, bool)
    mask[:2] = True
    assert folding_percent(det, mask) == 100.0
    assert std_log_jacobian(np.full(shape, 2.0)) == pytest.approx(0.0)


def test_anisotropic_spacing_matters():
    shape, spacing = (6, 6, 6), (1.0, 1.0, 3.0)
    d = np.zeros((3,) + shape)
    d[2] = np.arange(6)[:, None, None] * 1.5  # +1.5 mm per slice of 3 mm -> dz/dz = 0.5
    det = jacobian_determinant(d, spacing)
    np.testing.assert_allclose(det, 1.5)


def test_tre_and_summary():
    a = np.array([[0, 0, 0], [1, 1, 1.0]])
    b = np.array([[3, 4, 0], [1, 1, 1.0]])
    t = target_registration_error(a, b)
    np.testing.assert_allclose(t, [5.0, 0.0])
    s = summarize(t)
    assert s["mean"] == 2.5 and s["max"] == 5.0 and s["n"] == 2
    with pytest.raises(InputError):
        target_registration_error(a, b[:1])
