"""Stacked LoraPair: stack axes read from the static ``in_ndim``, per-slice equality with ordinary pairs."""

import jax
import numpy as np
import pytest

from lorapro_jax import LoraPair, pair_matrices


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape)


def test_unstacked_pair_is_unchanged():
    p = LoraPair(_rand(0, (3, 5, 2)), _rand(1, (2, 7)), 0.5)
    assert p.stack_ndim == 0 and p.stack_shape == ()
    assert p.in_shape == (3, 5) and p.out_shape == (7,) and p.rank == 2
    a2, b2 = pair_matrices(p)
    assert a2.shape == (15, 2) and b2.shape == (2, 7)


def test_stacked_pair_shapes_and_delta_match_each_slice():
    a, b = _rand(0, (4, 3, 5, 2)), _rand(1, (4, 2, 7))
    p = LoraPair(a, b, 0.5, in_ndim=2)
    assert p.stack_shape == (4,) and p.in_shape == (3, 5) and p.out_shape == (7,)
    assert p.kernel_shape == (4, 3, 5, 7)
    d = np.asarray(p.delta())
    for i in range(4):
        ref = 0.5 * np.einsum("ijr,rk->ijk", np.asarray(a[i]), np.asarray(b[i]))
        np.testing.assert_allclose(d[i], ref, rtol=1e-5, atol=1e-5)
        # The slice nnx.scan hands a layer keeps the static fields and reads as an ordinary pair.
        s = jax.tree.map(lambda x: x[i], p)
        assert s.stack_ndim == 0 and s.in_shape == (3, 5)
        np.testing.assert_allclose(np.asarray(s.delta()), d[i], rtol=1e-6, atol=1e-6)


def test_replace_keeps_static_fields_and_tree_structure():
    p = LoraPair(_rand(0, (2, 3, 1)), _rand(1, (2, 1, 4)), 2.0, in_ndim=1)
    q = p.replace(b=p.b * 0)
    assert q.scale == 2.0 and q.in_ndim == 1
    assert jax.tree.structure(p) == jax.tree.structure(q)


def test_mismatched_stack_axes_name_both_shapes():
    p = LoraPair(_rand(0, (4, 3, 2)), _rand(1, (5, 2, 7)), 1.0, in_ndim=1)
    with pytest.raises(ValueError, match=r"\(4, 3, 2\).*\(5, 2, 7\)"):
        pair_matrices(p)
