"""loss.compact.basis and binary_rotation: the principal basis, the random rotations, and the encoder's Dense layer."""

import numpy as np
import torch

from embedtrain.losses.compact import random_rotation
from embedtrain.train.compact import principal_basis


def correlated(n=600, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.2, d)  # distinct variances: the principal axes are well determined
    mixing = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    x = (torch.randn(n, d, generator=g) * scales) @ mixing.T
    return x - x.mean(0)


def test_principal_basis_is_a_rotation_onto_the_axes_of_largest_variance_first():
    x = correlated()
    basis = principal_basis(x)
    # 1e-5: float32 rounding of a float64 rotation of 12 dimensions
    assert torch.allclose(basis.T @ basis, torch.eye(12), atol=1e-5)
    variances = (x @ basis).pow(2).mean(0)
    assert torch.all(variances[:-1] >= variances[1:])  # largest first
    # the variance a prefix keeps is the sum of the top eigenvalues, the most any k-dimensional subspace keeps
    eigen = torch.linalg.eigvalsh((x.T @ x).double() / len(x)).flip(0)
    for k in (4, 8):  # 1e-5 relative: float32 coordinates of 600 rows
        assert abs(variances[:k].sum().item() - eigen[:k].sum().item()) < 1e-5 * eigen.sum().item()
    # the coordinates are uncorrelated: their covariance is diagonal
    cov = (x @ basis).T @ (x @ basis) / len(x)
    assert torch.allclose(cov - torch.diag(torch.diagonal(cov)), torch.zeros(12, 12), atol=1e-4)


def test_random_rotations_are_orthogonal_fixed_and_one_per_size():
    r = random_rotation(16)
    assert r.shape == (16, 16) and r.dtype == torch.float32
    assert torch.allclose(r @ r.T, torch.eye(16), atol=1e-6)  # 1e-6: a float64 QR rounded to float32
    assert torch.equal(r, random_rotation(16))  # the same matrix in every run and process
    assert not torch.allclose(random_rotation(16, seed=1), r)
    assert not torch.allclose(random_rotation(8), r[:8, :8])  # each size its own draw


def test_the_encoder_saves_the_centre_and_basis_in_one_dense_layer_and_reads_them_back(tiny_bert, tmp_path):
    from embedtrain.models import load_text_encoder

    encoder = load_text_encoder(str(tiny_bert), max_length=32)
    texts = ["small red tree", "computer network data", "the river is dark", "music and sound"]
    raw = encoder.encode(texts)
    center = raw.mean(0)
    basis = principal_basis(correlated(d=32))
    encoder.set_center(center, basis)
    ours = encoder.encode(texts)
    # 1e-6: the same float32 operations, normalised once more
    assert torch.allclose(ours, torch.nn.functional.normalize((raw - center) @ basis, dim=-1), atol=1e-6)
    encoder.save(tmp_path / "m")
    back = load_text_encoder(str(tmp_path / "m"))
    # 1e-6: the basis is stored as it is (transposed); 1e-5: the centre comes back through one float32 product
    assert torch.allclose(back.basis, basis, atol=1e-6) and torch.allclose(back.center, center, atol=1e-5)
    assert np.allclose(back.encode(texts).numpy(), ours.numpy(), atol=1e-5)
