r"""Synthetic target distributions with exact, normalised densities.

The data sets of Grenioux, Moulines and Gabrié (2023), used to check that an energy-based model
(or a sampler) puts the right mass on each mode. Every data set offers

- ``sample(n, generator=None) -> (n, dim)``: exact i.i.d. draws,
- ``log_prob(x) -> (...,)``: the exact normalised log-density of ``x`` of shape ``(..., dim)``,
- ``potential(x) = -log_prob(x)``: the same, in Pyro's sign convention, for samplers,
- ``mode_index(x) -> (...,)`` (``torch.long``): the mode each point belongs to,
- ``means`` ``(K, dim)``, ``weights`` ``(K,)``, ``dim`` and ``name``.

Tensors are created in the default dtype current at call time (``float64`` in the tests, usually
``float32`` for users); ``log_prob`` works in the dtype of its input.

References:

- Grenioux, Moulines, Gabrié, *Balanced Training of Energy-Based Models with Adaptive Flow
  Sampling* (2023), https://arxiv.org/abs/2306.00684
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .._checks import check_int

__all__ = [
    "DATASETS",
    "Dataset",
    "GaussianMixture",
    "Rings",
    "available",
    "eight_gaussians",
    "imbalanced_pair",
    "line4",
    "load",
    "mixture_hd",
    "nearest_mean_index",
    "rings",
    "two_to_one",
]

_LOG_2PI = math.log(2.0 * math.pi)
# Largest number of elements of the (chunk, K, dim) difference tensors built at once.
_MAX_ELEMENTS = 1 << 22


def _float_dtype() -> torch.dtype:
    return torch.get_default_dtype()


def _as_points(x: torch.Tensor, dim: int, argname: str = "x") -> torch.Tensor:
    x = torch.as_tensor(x)
    if not torch.is_floating_point(x):
        x = x.to(_float_dtype())
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"{argname} must have shape (..., {dim}), got {tuple(x.shape)}")
    return x


def _check_n(n: int) -> int:
    return check_int("n", n, 0)


def _row_chunk(per_row: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return check_int("chunk_size", chunk_size, 1)
    return max(1, _MAX_ELEMENTS // max(per_row, 1))


def nearest_mean_index(
    x: torch.Tensor, means: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    r"""Index of the nearest (Euclidean) mean of each point: the nearest-mode partition.

    Points are processed in chunks of rows, so that ``10**6`` points in dimension 64 need only a
    few tens of MB. Ties go to the lowest index.

    :param torch.Tensor x: points of shape ``(..., dim)``.
    :param torch.Tensor means: mode locations of shape ``(K, dim)``.
    :param int chunk_size: rows per chunk; by default chosen so that a chunk holds about
        ``4 * 10**6`` numbers.
    :returns: ``torch.long`` tensor of shape ``x.shape[:-1]``.

    Example:

    >>> nearest_mean_index(torch.tensor([[0.9, 0.0], [-2.0, 0.1]]), torch.tensor([[1.0, 0.0],
    ...                                                                    [-1.0, 0.0]]))
    tensor([0, 1])
    """
    means = torch.as_tensor(means)
    if means.dim() != 2 or means.shape[0] == 0:
        raise ValueError(f"means must have shape (K, dim) with K >= 1, got {tuple(means.shape)}")
    x = _as_points(x, means.shape[1])
    means = means.to(device=x.device, dtype=x.dtype)
    batch_shape = x.shape[:-1]
    flat = x.detach().reshape(-1, x.shape[-1])
    step = _row_chunk(means.numel(), chunk_size)
    out = [
        (flat[i : i + step, None, :] - means).pow(2).sum(-1).argmin(-1)
        for i in range(0, flat.shape[0], step)
    ]
    if not out:
        return torch.zeros(batch_shape, dtype=torch.long, device=x.device)
    return torch.cat(out).reshape(batch_shape)


class Dataset:
    r"""Base class of the synthetic data sets: a distribution on :math:`\mathbb{R}^{dim}` with
    ``K`` modes located at ``means`` with mass ``weights``.

    Subclasses implement :meth:`sample` and :meth:`log_prob`; :meth:`potential` and
    :meth:`mode_index` (nearest-mean partition) come for free.

    :param str name: a short name (the key in :data:`DATASETS` for the built-in sets).
    :param torch.Tensor means: mode locations ``(K, dim)``.
    :param torch.Tensor weights: mode masses ``(K,)``, summing to one.
    """

    def __init__(self, name: str, means: torch.Tensor, weights: torch.Tensor) -> None:
        self.name = name
        self._means = means.detach().to(torch.float64).clone()
        self._weights = weights.detach().to(torch.float64).clone()

    @property
    def dim(self) -> int:
        r"""Dimension of the space."""
        return self._means.shape[1]

    @property
    def num_modes(self) -> int:
        r"""Number of modes ``K``."""
        return self._means.shape[0]

    @property
    def means(self) -> torch.Tensor:
        r"""Mode locations ``(K, dim)`` in the current default dtype."""
        return self._means.to(_float_dtype())

    @property
    def weights(self) -> torch.Tensor:
        r"""Mode masses ``(K,)`` in the current default dtype."""
        return self._weights.to(_float_dtype())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Draw ``n`` i.i.d. points, shape ``(n, dim)``."""
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r"""Exact normalised log-density of ``x`` ``(..., dim)``; returns shape ``(...,)``."""
        raise NotImplementedError

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        r"""Potential energy ``-log_prob(x)``, batched: ``(..., dim) -> (...,)``.

        :param torch.Tensor x: points of shape ``(..., dim)``.
        """
        return -self.log_prob(x)

    def mode_index(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        r"""Mode of each point: index of the nearest mean (Euclidean), ``torch.long``.

        :param torch.Tensor x: points of shape ``(..., dim)``.
        :param int chunk_size: rows per chunk (see :func:`nearest_mean_index`).
        """
        return nearest_mean_index(_as_points(x, self.dim), self._means, chunk_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, K={self.num_modes})"


class GaussianMixture(Dataset):
    r"""Finite mixture of Gaussians :math:`\sum_k w_k \mathcal{N}(\mu_k, \Sigma_k)`.

    Each component is either isotropic, :math:`\Sigma_k = s_k^2 I` (give ``scale``: one standard
    deviation shared by all components, or one per component), or has a full covariance (give
    ``covariance``: ``(dim, dim)`` shared or ``(K, dim, dim)``). ``log_prob`` is a ``logsumexp``
    over components, vectorised over points (chunked to bound memory) and differentiable.

    :param torch.Tensor means: component means ``(K, dim)``.
    :param torch.Tensor weights: non-negative component weights ``(K,)`` with a positive sum; they
        are normalised to sum to one.
    :param scale: isotropic standard deviation(s): a positive float or a ``(K,)`` tensor.
    :param torch.Tensor covariance: symmetric positive definite covariance(s) instead of
        ``scale``.
    :param str name: name of the data set.

    Example:

    >>> gm = GaussianMixture(torch.tensor([[-1.0], [1.0]]), torch.tensor([0.5, 0.5]), scale=0.1)
    >>> gm.sample(5).shape
    torch.Size([5, 1])
    >>> gm.log_prob(torch.tensor([[1.0]])).exp()  # 0.5 / (0.1 * sqrt(2 pi))
    tensor([1.9947])
    """

    def __init__(
        self,
        means: torch.Tensor,
        weights: torch.Tensor,
        scale: float | torch.Tensor | None = None,
        *,
        covariance: torch.Tensor | None = None,
        name: str = "gaussian_mixture",
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[0] == 0 or means.shape[1] == 0:
            raise ValueError(
                f"means must have shape (K, dim) with K, dim >= 1, got {tuple(means.shape)}"
            )
        k, d = means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and have a positive sum")
        super().__init__(name, means, weights / weights.sum())
        if (scale is None) == (covariance is None):
            raise ValueError("give exactly one of scale and covariance")
        self._scale: torch.Tensor | None = None
        self._scale_tril: torch.Tensor | None = None
        if scale is not None:
            s = torch.as_tensor(scale, dtype=torch.float64)
            if s.dim() == 0:
                s = s.expand(k)
            if s.shape != (k,) or not torch.isfinite(s).all() or (s <= 0).any():
                raise ValueError(f"scale must be a positive float or a positive ({k},) tensor")
            self._scale = s.clone()
        else:
            cov = torch.as_tensor(covariance, dtype=torch.float64)
            if cov.shape == (d, d):
                cov = cov.expand(k, d, d)
            if cov.shape != (k, d, d):
                raise ValueError(
                    f"covariance must have shape ({d}, {d}) or ({k}, {d}, {d}), "
                    f"got {tuple(cov.shape)}"
                )
            if not torch.allclose(cov, cov.transpose(-1, -2)):
                raise ValueError("covariance must be symmetric")
            tril, info = torch.linalg.cholesky_ex(cov)
            if (info != 0).any():
                raise ValueError("covariance must be positive definite")
            self._scale_tril = tril.clone()

    @property
    def scale(self) -> torch.Tensor | None:
        r"""Isotropic standard deviations ``(K,)``, or ``None`` for full covariances."""
        return None if self._scale is None else self._scale.to(_float_dtype())

    @property
    def covariance(self) -> torch.Tensor:
        r"""Component covariances ``(K, dim, dim)`` in the current default dtype."""
        if self._scale is not None:
            eye = torch.eye(self.dim, dtype=torch.float64)
            cov = self._scale.pow(2)[:, None, None] * eye
        else:
            cov = self._scale_tril @ self._scale_tril.transpose(-1, -2)
        return cov.to(_float_dtype())

    def sample_with_labels(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Draw ``n`` points and the component each came from.

        :param int n: number of draws.
        :param torch.Generator generator: optional random generator, for reproducibility.
        :returns: ``(x, labels)`` of shapes ``(n, dim)`` and ``(n,)`` (``torch.long``).
        """
        n = _check_n(n)
        dtype = _float_dtype()
        if n == 0:
            return torch.zeros(0, self.dim, dtype=dtype), torch.zeros(0, dtype=torch.long)
        labels = torch.multinomial(self._weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        if self._scale is not None:
            noise = self._scale[labels, None] * eps
        else:
            noise = (self._scale_tril[labels] @ eps[:, :, None]).squeeze(-1)
        return (self._means[labels] + noise).to(dtype), labels

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Draw ``n`` i.i.d. points.

        :param int n: number of draws.
        :param torch.Generator generator: optional random generator, for reproducibility.
        :returns: tensor of shape ``(n, dim)`` in the default dtype.
        """
        return self.sample_with_labels(n, generator)[0]

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r"""Log-density of each component (without the weights), shape ``(..., K)``.

        :param torch.Tensor x: points of shape ``(..., dim)``.
        """
        x = _as_points(x, self.dim)
        opts = {"device": x.device, "dtype": x.dtype}
        means = self._means.to(**opts)
        batch_shape, d = x.shape[:-1], self.dim
        flat = x.reshape(-1, d)
        step = _row_chunk(means.numel(), None)
        if self._scale is not None:
            scale = self._scale.to(**opts)
            const = -0.5 * d * _LOG_2PI - d * scale.log()
            chunks = [
                const
                - 0.5 * ((flat[i : i + step, None, :] - means) / scale[:, None]).pow(2).sum(-1)
                for i in range(0, flat.shape[0], step)
            ]
        else:
            tril = self._scale_tril.to(**opts)
            const = -0.5 * d * _LOG_2PI - tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            chunks = []
            for i in range(0, flat.shape[0], step):
                diff = (flat[i : i + step, None, :] - means)[..., None]  # (m, K, d, 1)
                z = torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)
                chunks.append(const - 0.5 * z.pow(2).sum(-1))
        out = torch.cat(chunks) if chunks else flat.new_zeros(0, self.num_modes)
        return out.reshape(*batch_shape, self.num_modes)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r"""Exact log-density :math:`\log \sum_k w_k \mathcal{N}(x; \mu_k, \Sigma_k)`.

        :param torch.Tensor x: points of shape ``(..., dim)``.
        :returns: tensor of shape ``(...,)`` in the dtype of ``x``.
        """
        lp = self.component_log_prob(x)
        return torch.logsumexp(lp + self._weights.to(lp).log(), dim=-1)


class Rings(Dataset):
    r"""Concentric rings in 2-D: a uniform angle and a radius drawn from a mixture of normals.

    The radial law is the equal-weight mixture :math:`\frac1K \sum_i \mathcal{N}(r_i, s^2)`
    **truncated to** :math:`r > 0` **and renormalised** (``sample`` redraws the pair
    (component, radius) whenever the radius is not positive, which is exact rejection sampling of
    the truncated law). The density in the plane is then exactly

    .. math:: p(x) = \frac{p_r(|x|)}{2\pi |x|},\qquad
              p_r(r) = \frac{\sum_i \mathcal{N}(r; r_i, s^2)}{\sum_i \Phi(r_i / s)}, \quad r > 0.

    It has an integrable :math:`1/|x|` singularity at the origin (of height
    :math:`p_r(0) \approx 10^{-10}` for the default rings); ``log_prob`` clamps :math:`|x|` below
    at the smallest positive normal number of the dtype, so it stays finite.

    The modes are the rings: ``radii`` ``(K,)``, ``weights`` ``1/K`` each, and ``means`` ``(K, 2)``
    holds one representative point per ring, :math:`(r_i, 0)`. Do **not** partition points by
    the nearest of these ``means``: :meth:`mode_index` assigns each point to the ring of nearest
    radius, and :func:`pyro_ebm.metrics.mode_weights` uses it when given the data set itself.

    :param radii: ring radii, positive and strictly increasing.
    :param float scale: standard deviation of the radius around each ring.
    :param str name: name of the data set.

    Example:

    >>> ds = Rings()
    >>> ds.mode_index(torch.tensor([[0.0, 1.1], [-2.9, 0.2]]))
    tensor([0, 2])
    """

    def __init__(
        self,
        radii: Sequence[float] | torch.Tensor = (1.0, 2.0, 3.0, 4.0),
        scale: float = 0.15,
        name: str = "rings",
    ) -> None:
        radii = torch.as_tensor(radii, dtype=torch.float64)
        if radii.dim() != 1 or radii.numel() == 0 or (radii <= 0).any():
            raise ValueError("radii must be a non-empty 1-D sequence of positive numbers")
        if (radii[1:] <= radii[:-1]).any():
            raise ValueError("radii must be strictly increasing")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive float, got {scale!r}")
        k = radii.numel()
        means = torch.stack([radii, torch.zeros_like(radii)], dim=-1)
        super().__init__(name, means, torch.full((k,), 1.0 / k, dtype=torch.float64))
        self._radii = radii.clone()
        self.scale = float(scale)
        # log of the mass of the radial mixture on r > 0: log(mean_i Phi(r_i / s)).
        self._log_mass = torch.special.log_ndtr(radii / scale).logsumexp(0).item() - math.log(k)

    @property
    def radii(self) -> torch.Tensor:
        r"""Ring radii ``(K,)`` in the current default dtype."""
        return self._radii.to(_float_dtype())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Draw ``n`` i.i.d. points.

        :param int n: number of draws.
        :param torch.Generator generator: optional random generator, for reproducibility.
        :returns: tensor of shape ``(n, 2)`` in the default dtype.
        """
        n = _check_n(n)
        r = torch.empty(n, dtype=torch.float64)
        todo = torch.arange(n)
        while todo.numel() > 0:
            comp = torch.randint(self.num_modes, (todo.numel(),), generator=generator)
            eps = torch.randn(todo.numel(), generator=generator, dtype=torch.float64)
            r[todo] = self._radii[comp] + self.scale * eps
            todo = todo[r[todo] <= 0]
        theta = 2.0 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        x = torch.stack([r * theta.cos(), r * theta.sin()], dim=-1)
        return x.to(_float_dtype())

    def radial_log_prob(self, r: torch.Tensor) -> torch.Tensor:
        r"""Log-density of the (truncated, renormalised) radial law; ``-inf`` for ``r <= 0``.

        :param torch.Tensor r: radii of any shape.
        """
        r = torch.as_tensor(r)
        if not torch.is_floating_point(r):
            r = r.to(_float_dtype())
        radii = self._radii.to(device=r.device, dtype=r.dtype)
        z = (r[..., None] - radii) / self.scale
        comp = -0.5 * z.pow(2) - 0.5 * _LOG_2PI - math.log(self.scale)
        lp = comp.logsumexp(-1) - math.log(self.num_modes) - self._log_mass
        return torch.where(r > 0, lp, torch.full_like(lp, -math.inf))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r"""Exact log-density :math:`\log p_r(|x|) - \log(2\pi|x|)`.

        :param torch.Tensor x: points of shape ``(..., 2)``.
        :returns: tensor of shape ``(...,)`` in the dtype of ``x``.
        """
        x = _as_points(x, 2)
        # sum of squares then sqrt, clamped: finite with finite gradients at the origin
        r = x.pow(2).sum(-1).clamp_min(torch.finfo(x.dtype).tiny).sqrt()
        return self.radial_log_prob(r) - math.log(2.0 * math.pi) - r.log()

    def mode_index(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        r"""Ring of nearest radius of each point, ``torch.long`` of shape ``x.shape[:-1]``.

        :param torch.Tensor x: points of shape ``(..., 2)``.
        :param int chunk_size: unused (kept for a common signature).
        """
        x = _as_points(x, 2).detach()
        r = torch.linalg.vector_norm(x, dim=-1)
        radii = self._radii.to(device=x.device, dtype=x.dtype)
        return (r[..., None] - radii).abs().argmin(-1)


def two_to_one() -> GaussianMixture:
    r"""Two modes in 2-D with weights 1/3 and 2/3 (0.05 and 0.1 are variances):

    .. math:: \tfrac13 \mathcal{N}(-1.5\,(1,1), 0.05\,I_2)
              + \tfrac23 \mathcal{N}(1.5\,(1,1), 0.1\,I_2)

    Reference: Grenioux, Moulines, Gabrié (2023), https://arxiv.org/abs/2306.00684

    >>> two_to_one().weights
    tensor([0.3333, 0.6667])
    """
    means = torch.tensor([[-1.5, -1.5], [1.5, 1.5]], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0], dtype=torch.float64) / 3.0
    scale = torch.tensor([0.05, 0.1], dtype=torch.float64).sqrt()
    return GaussianMixture(means, weights, scale, name="two_to_one")


def line4() -> GaussianMixture:
    r"""Four modes on the horizontal axis at :math:`x = -3, -1, 1, 3` (:math:`y = 0`), variance
    0.05 each, weights (0.1, 0.2, 0.3, 0.4) from left to right.

    Reference: Grenioux, Moulines, Gabrié (2023), https://arxiv.org/abs/2306.00684

    >>> line4().means[:, 0]
    tensor([-3., -1.,  1.,  3.])
    """
    xs = torch.linspace(-3.0, 3.0, 4, dtype=torch.float64)
    means = torch.stack([xs, torch.zeros_like(xs)], dim=-1)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    return GaussianMixture(means, weights, math.sqrt(0.05), name="line4")


def eight_gaussians(radius: float = 1.0, scale: float = 0.15) -> GaussianMixture:
    r"""Eight equal modes on a circle, at angles :math:`2\pi k / 8`, with standard deviation
    ``scale``.

    :param float radius: radius of the circle (1 in the paper).
    :param float scale: standard deviation of each mode (0.15 in the paper).

    Reference: Grenioux, Moulines, Gabrié (2023), https://arxiv.org/abs/2306.00684

    >>> eight_gaussians().means.norm(dim=-1).allclose(torch.ones(8))
    True
    """
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a positive float, got {radius!r}")
    angles = 2.0 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=-1)
    return GaussianMixture(
        means, torch.full((8,), 1.0 / 8, dtype=torch.float64), scale, name="eight_gaussians"
    )


def rings(scale: float = 0.15) -> Rings:
    r"""Four concentric rings of radii 1, 2, 3, 4 with radial standard deviation ``scale``,
    equal weights; see :class:`Rings` for the exact density (radial mixture truncated to
    :math:`r > 0`).

    :param float scale: standard deviation of the radius (0.15 in the paper).

    Reference: Grenioux, Moulines, Gabrié (2023), https://arxiv.org/abs/2306.00684

    >>> rings().sample(3).shape
    torch.Size([3, 2])
    """
    return Rings((1.0, 2.0, 3.0, 4.0), scale, name="rings")


def _check_dim(dim: int, minimum: int) -> int:
    return check_int("dim", dim, minimum)


def mixture_hd(dim: int = 16) -> GaussianMixture:
    r"""Equal-weight mixture of four unit-covariance Gaussians in dimension ``dim``.

    With :math:`a = 0.591 \sqrt{2 \log d}` and :math:`\mathbf 1_h` the all-ones vector of size
    :math:`h = d/2`, the means are, in order,
    :math:`\mu_1 = a(\mathbf 1_h, \mathbf 1_h)`, :math:`\mu_2 = a(-\mathbf 1_h, \mathbf 1_h)`,
    :math:`\mu_3 = -\mu_2`, :math:`\mu_4 = -\mu_1`. ``dim`` must be even (and >= 2) so that the
    halves are equal; the modes are well separated only for larger ``dim`` (they overlap strongly
    at ``dim = 2``; from ``dim = 16`` on, the nearest-mean partition misclassifies < 0.1%).

    :param int dim: even dimension >= 2.

    Reference: Grenioux, Moulines, Gabrié (2023), https://arxiv.org/abs/2306.00684

    >>> ds = mixture_hd(4)
    >>> ds.means[1] / ds.means[0, 0]
    tensor([-1., -1.,  1.,  1.])
    """
    _check_dim(dim, 2)
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    a = 0.591 * math.sqrt(2.0 * math.log(dim))
    ones = torch.ones(dim, dtype=torch.float64)
    mu1 = a * ones
    mu2 = a * torch.cat([-ones[: dim // 2], ones[dim // 2 :]])
    means = torch.stack([mu1, mu2, -mu2, -mu1])
    return GaussianMixture(
        means, torch.full((4,), 0.25, dtype=torch.float64), 1.0, name="mixture_hd"
    )


def imbalanced_pair(dim: int = 2) -> GaussianMixture:
    r"""Two unit-covariance Gaussians in dimension ``dim`` with unequal weights: mode 0 (light,
    weight 0.2) at :math:`-4\,\mathbf 1`, mode 1 (heavy, weight 0.8) at :math:`+4\,\mathbf 1`.

    :param int dim: dimension >= 1.

    Reference: Grenioux, Moulines, Gabrié (2023), https://arxiv.org/abs/2306.00684

    >>> imbalanced_pair(3).means
    tensor([[-4., -4., -4.],
            [ 4.,  4.,  4.]])
    """
    _check_dim(dim, 1)
    means = 4.0 * torch.stack([-torch.ones(dim), torch.ones(dim)]).to(torch.float64)
    weights = torch.tensor([0.2, 0.8], dtype=torch.float64)
    return GaussianMixture(means, weights, 1.0, name="imbalanced_pair")


DATASETS: dict[str, Callable[..., Dataset]] = {
    "eight_gaussians": eight_gaussians,
    "imbalanced_pair": imbalanced_pair,
    "line4": line4,
    "mixture_hd": mixture_hd,
    "rings": rings,
    "two_to_one": two_to_one,
}
"""Registry of the built-in data sets: name -> factory."""


def available() -> list[str]:
    r"""Sorted names of the built-in data sets.

    >>> available()
    ['eight_gaussians', 'imbalanced_pair', 'line4', 'mixture_hd', 'rings', 'two_to_one']
    """
    return sorted(DATASETS)


def load(name: str, **kwargs) -> Dataset:
    r"""Build a data set by name.

    :param str name: one of :func:`available`.
    :param kwargs: passed to the factory (e.g. ``dim`` for ``mixture_hd``).

    >>> load("mixture_hd", dim=8).dim
    8
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {available()}, got {name!r}")
    return DATASETS[name](**kwargs)
