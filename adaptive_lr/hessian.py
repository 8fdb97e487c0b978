"""Curvature probe: the top Hessian eigenvalue ("sharpness") of the training loss.

Two Hessian-vector-product (HVP) back ends turn a loss into a function ``v -> Hv``:

* :func:`autograd_hvp` differentiates twice, ``Hv = d<grad f(x), v>/dx``, from a
  ``loss_fn`` that returns the loss with its graph (exact up to rounding).
* :func:`closure_hvp` uses a standard ``optimizer.step(closure)`` training closure and a
  central difference of gradients, ``Hv ~ (grad f(x + eps v) - grad f(x - eps v)) / (2 eps)``,
  and leaves parameters and ``.grad`` exactly as it found them.

Three eigenvalue solvers consume an HVP:

* :func:`top_eigenvalue` runs power iteration on the list of parameter-shaped tensors
  (no flattening, one host sync per iteration) and can warm-start from the previous
  probe's vector, since sharpness drifts slowly during training (its value does; a
  sharper direction that appears elsewhere takes many warm-started products to find).
* :func:`krylov_top_eigenvalue` spends the same products on a Lanczos (Krylov) space on
  the same tensors, with the same warm start and stopping rule: its estimate is the top
  Ritz value of that space, never below power iteration's on a symmetric Hessian, at the
  price of holding the space's basis during the call.
* :func:`lanczos_top_eigenvalue` is the reference: SciPy's ARPACK Lanczos on the
  flattened operator, in float64, for tests and small models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import Tensor

__all__ = [
    "HVP",
    "SharpnessEstimate",
    "autograd_hvp",
    "closure_hvp",
    "krylov_top_eigenvalue",
    "lanczos_top_eigenvalue",
    "top_eigenvalue",
]

HVP = Callable[[list[Tensor]], list[Tensor]]
"""A Hessian-vector product ``v -> Hv``; ``v`` and ``Hv`` are lists shaped like the params."""

_DEFAULT_SEED = 0


@dataclass(frozen=True)
class SharpnessEstimate:
    """Result of a top-eigenvalue probe.

    Attributes:
        eigenvalue: Rayleigh quotient ``v'Hv / v'v`` at the solver's last iterate ``v``
            (unit: loss / param^2).
        iterations: number of Hessian-vector products spent.
        converged: whether the solver's stopping rule was met before its budget ran out.
        vector: the unit-norm estimate of the top eigenvector, shaped like the params:
            for power iteration ``Hv / ||Hv||``, one product past ``v`` (``v`` itself,
            normalised, when a zero or non-finite product left nothing to advance to);
            for Lanczos the Ritz vector, ``v`` itself. Pass it as ``initial=`` (and
            ``eigenvalue`` as ``reference=``) to warm-start the next probe.
    """

    eigenvalue: float
    iterations: int
    converged: bool
    vector: list[Tensor]


def autograd_hvp(loss_fn: Callable[[], Tensor], params: Sequence[Tensor]) -> HVP:
    """Exact Hessian-vector product by double backward.

    ``Hv = d/dx <g(x), v>`` with ``g(x) = df/dx`` built once with ``create_graph=True``.
    ``loss_fn`` is called once, here, and must return the scalar loss with its graph
    (it must not call ``backward`` itself); the first-order gradient graph is retained,
    so ``k`` products cost one forward + backward and ``k`` double-backward passes. The
    graph (and its memory) lives as long as the returned function does.

    Parameters that the loss does not depend on get ``Hv = 0``.
    """
    params = _validated_params(params)
    with torch.enable_grad():  # optimizer.step() runs under no_grad
        loss = loss_fn()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar loss tensor")
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # Only gradients that still depend on the params contribute: a constant gradient (an
    # unused param, or one the loss is linear in) is a zero row and column of the Hessian.
    curved = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def hvp(vector: list[Tensor]) -> list[Tensor]:
        _check_like_params(vector, params, "vector")
        if not curved:
            return [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            products = torch.autograd.grad(
                [grads[i] for i in curved],
                params,
                grad_outputs=[vector[i] for i in curved],
                retain_graph=True,
                allow_unused=True,
            )
        return [torch.zeros_like(p) if h is None else h for p, h in zip(params, products, strict=True)]

    return hvp


def closure_hvp(
    closure: Callable[[], Any],
    params: Sequence[Tensor],
    *,
    relative_step: float = 1e-3,
    gradient: Sequence[Tensor] | None = None,
) -> HVP:
    """Finite-difference Hessian-vector product through a standard training closure.

    Central differences (the default)::

        Hv ~ (grad f(x + eps v) - grad f(x - eps v)) / (2 eps)

    or, given ``gradient`` = grad f(x), forward differences at half the cost::

        Hv ~ (grad f(x + eps v) - grad f(x)) / eps

    with ``eps = relative_step * (1 + ||x||) / ||v||``, so the parameters move by
    ``||eps v|| = relative_step * (1 + ||x||)`` (norms over all params together).
    ``grad f`` at a shifted point is read from ``p.grad`` (``None`` counts as zeros)
    after calling ``closure()``, which should do the usual
    ``zero_grad(); loss = ...; loss.backward(); return loss``; ``p.grad`` is cleared
    before each call, so a closure that forgets ``zero_grad`` still works. Each product
    costs two closure calls (central) or one (forward). The truncation error is
    ``O(eps^2)`` (central) or ``O(eps)`` (forward) from third derivatives, zero on a
    quadratic either way, plus rounding of order
    ``machine_epsilon * ||grad f|| / ||eps v||``.

    Afterwards, even if the closure raises, every parameter holds bit-for-bit its value
    from before the call (restored from a copy, not by subtracting the shift), and every
    ``p.grad`` is the same tensor object (or ``None``) holding the same values, so the
    caller's optimizer step proceeds as if no probe happened. The copies are taken once
    for a run of products and kept while every parameter and ``.grad`` stays the same
    tensor with the same version counter (any in-place write, an optimizer step
    included, takes them again); they hold a parameter-sized buffer and a gradient-sized
    one as long as the returned function lives.

    Limitation: the closure must be a deterministic function of the parameters. Dropout
    draws different masks for the two points (the difference is then noise, not
    curvature), and layers that update state in forward, such as batch-norm running
    statistics in train mode, are updated by the probe's calls and are not restored.
    Put such models in ``eval()`` for the probe, or use :func:`autograd_hvp`.

    Args:
        closure: callable that recomputes the loss and writes its gradient into ``p.grad``.
        params: the parameters the Hessian is taken over; all must require grad.
        relative_step: step length as a fraction of ``1 + ||x||`` (dimensionless, > 0).
            The default 1e-3 is near the cube root of float32 machine epsilon (5e-3),
            the usual balance of truncation against rounding for central differences;
            float64 models can use about 1e-5.
        gradient: grad f at the current parameters, one tensor per param (e.g. the
            ``p.grad`` a training step just computed): switches to forward differences.
            It is copied, so later writes to those tensors do not change the products.
            Suited to smooth losses: on ReLU networks a shift of ``relative_step`` crosses
            activation kinks, and power iteration over forward differences locks onto
            them (on the 1M-parameter MLP of benchmarks/overhead.py it read 0.21, central
            differences 0.056, autograd 0.035), which is why the wrapper's probe uses
            central ones.
    """
    params = _validated_params(params)
    if not (math.isfinite(relative_step) and relative_step > 0):
        raise ValueError(f"relative_step must be a positive finite number, got {relative_step!r}")
    base: list[Tensor] | None = None
    if gradient is not None:
        _check_like_params(gradient, params, "gradient")
        base = [g.detach().clone() for g in gradient]
    saved: _SavedPoint | None = None

    def gradient_at_current_params(*, keep: bool) -> list[Tensor]:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            closure()
        # Cloned where it must outlive the next closure call (.grad may be a buffer that
        # call's backward reuses) and where it is a view (of DDP's buckets, say), which
        # the restore of the caller's gradients would overwrite.
        return [
            torch.zeros_like(p)
            if p.grad is None
            else (p.grad.detach().clone() if keep or p.grad._is_view() else p.grad.detach())
            for p in params
        ]

    def hvp(vector: list[Tensor]) -> list[Tensor]:
        nonlocal saved
        _check_like_params(vector, params, "vector")
        if saved is None or not saved.still_current(params):
            saved = _SavedPoint(params)
        point = saved
        try:
            # Scale-aware step: rounding of x + eps v is relative to ||x||, so the step must
            # grow with ||x|| to stay above it; the 1 keeps it from vanishing near x = 0;
            # dividing by ||v|| makes the shift independent of v's scale (Hv is linear in v).
            # eps stays a device tensor, so the probe adds no host sync.
            v_norm = _global_norm(vector)
            # A zero v gives Hv = 0 with any finite eps; 1 avoids 0/0.
            eps = torch.where(v_norm > 0, relative_step * (1 + point.norm) / v_norm, 1.0)
            eps_per_tensor = [eps.to(p.device) for p in params]
            shift = torch._foreach_mul(vector, eps_per_tensor)
            with torch.no_grad():
                torch._foreach_add_(params, shift)
            grad_plus = gradient_at_current_params(keep=base is None)
            if base is not None:
                torch._foreach_sub_(grad_plus, base)  # in place: the product
                torch._foreach_div_(grad_plus, eps_per_tensor)
                return grad_plus
            with torch.no_grad():
                for p, x, s in zip(params, point.values, shift, strict=True):
                    torch.sub(x, s, out=p)  # x - eps v, rounded as from x itself
            del shift  # one parameter-sized buffer fewer while the closure runs again
            grad_minus = gradient_at_current_params(keep=False)
            torch._foreach_sub_(grad_plus, grad_minus)  # in place: the product
            del grad_minus
            torch._foreach_div_(grad_plus, torch._foreach_mul(eps_per_tensor, 2.0))
            return grad_plus
        finally:
            point.restore(params)

    return hvp


class _SavedPoint:
    """The parameters and gradients a Hessian-vector product must leave as it found them.

    Kept from one product to the next of a probe: while every parameter and every
    ``.grad`` is the same tensor, at the same address, with the same version counter
    (which in-place writes bump) as after the last restore, the copies are current and
    the next product saves nothing again.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.values = [p.detach().clone() for p in params]
        self.norm = _global_norm(self.values)
        self.grads = [p.grad for p in params]
        self.grad_values = [None if g is None else g.detach().clone() for g in self.grads]
        self.keys = self._keys(params)

    def _keys(self, params: list[Tensor]) -> list[tuple[int, int] | None]:
        return [_key(t) for t in params] + [None if g is None else _key(g) for g in self.grads]

    def still_current(self, params: list[Tensor]) -> bool:
        if not all(p.grad is g for p, g in zip(params, self.grads, strict=True)):
            return False
        keys = self._keys(params)
        tensors = [*params, *self.grads]
        plain = all(key is not None for key, t in zip(keys, tensors, strict=True) if t is not None)
        return plain and keys == self.keys

    def restore(self, params: list[Tensor]) -> None:
        """Every parameter bit for bit, every ``.grad`` the same tensor with the same values."""
        grad_keys = self.keys[len(params) :]
        with torch.no_grad():
            torch._foreach_copy_(params, self.values)
            for p, grad, values, key in zip(params, self.grads, self.grad_values, grad_keys, strict=True):
                # Copied back if it may have been written to: a view (of a buffer the
                # closure's backward reuses, e.g. DDP's buckets), or a tensor whose
                # version moved (a buffer the closure put back in .grad).
                if grad is not None and (grad._is_view() or key is None or _key(grad) != key):
                    grad.copy_(values)
                p.grad = grad
        self.keys = self._keys(params)


def _key(t: Tensor) -> tuple[int, int] | None:
    """(address, version counter) of a plain tensor; None for tensor subclasses."""
    if type(t) not in (Tensor, torch.nn.Parameter):
        return None
    return (t.data_ptr(), t._version)


def top_eigenvalue(
    hvp: HVP,
    params: Sequence[Tensor],
    *,
    iterations: int = 20,
    tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
    initial: Sequence[Tensor] | None = None,
    reference: float | None = None,
) -> SharpnessEstimate:
    """Top Hessian eigenvalue by power iteration.

    ``v_{k+1} = H v_k / ||H v_k||``, ``lambda_k = v_k' H v_k / v_k' v_k`` (Rayleigh
    quotient), stopping at iteration ``k`` once
    ``|lambda_k - lambda_{k-1}| <= tolerance * |lambda_k|`` (``converged=True``) or after
    ``iterations`` products. Near convergence the error in ``lambda`` is about
    ``tolerance * r^2 / (1 - r^2)`` relative, ``r = |lambda_2 / lambda_1|``, so a small
    eigen-gap needs a tolerance well below the accuracy wanted.

    The returned vector is the last iterate ``v_{k+1}``, one product past the one whose
    Rayleigh quotient is returned, so that a later call started from it (``initial=``,
    with ``reference=`` the returned eigenvalue as ``lambda_0``) carries the same power
    iteration on: its first product is then tested against ``reference`` as every later
    one is against its predecessor, and a call where the iteration has settled costs
    one product.

    Power iteration finds the eigenvalue of largest magnitude. That is the top
    eigenvalue whenever the most negative eigenvalue is smaller in magnitude, the
    common case in training. Otherwise the result is that negative eigenvalue; when the
    two magnitudes are (nearly) equal, the iterate oscillates between the two
    eigenvectors, the estimate lies anywhere between them and ``converged`` is
    usually ``False``. Use :func:`lanczos_top_eigenvalue` when this matters. On a
    positive semidefinite Hessian the estimate never exceeds the top eigenvalue.

    The vectors stay a list of parameter-shaped tensors, updated with ``torch._foreach``
    ops; each iteration does one host sync (reading ``lambda_k`` and ``||H v_k||``).

    Args:
        hvp: the Hessian-vector product, e.g. from :func:`autograd_hvp`.
        params: the parameters, for shapes, devices and dtypes; must be non-empty.
        iterations: maximum number of Hessian-vector products (>= 1).
        tolerance: relative change of the Rayleigh quotient that counts as converged (> 0).
        generator: random source of the start vector, which is drawn on the generator's
            device and then moved to each parameter's device and dtype; default is a CPU
            generator seeded with 0, so the probe is deterministic.
        initial: start vector instead of a random one, e.g. ``previous.vector``.
        reference: the Rayleigh quotient of the iterate before ``initial``, e.g.
            ``previous.eigenvalue``: the first product may then already meet the stopping
            rule. Ignored without ``initial``.
    """
    params = _validated_params(params)
    vector, previous = _solver_start(params, iterations, tolerance, generator, initial, reference)

    # Checked before any product is spent. The start vector is not normalised (that
    # would cost a pass over it), hence the / v'v below; later vectors have unit norm.
    squared_norm = _global_dot(vector, vector).item()
    if squared_norm == 0:
        raise ValueError("initial must be a nonzero vector")
    eigenvalue = math.nan
    converged = False
    advanced = False  # whether `vector` is a normalised product (else the start vector)
    completed = 0
    for completed in range(1, iterations + 1):
        product = [h.detach() for h in hvp(vector)]
        scalars = [_global_dot(vector, product), _global_norm(product)]
        if completed > 1:
            scalars.append(_global_dot(vector, vector))
        values = torch.stack(scalars).tolist()  # the one host sync of this iteration
        curvature, product_norm = values[:2]
        if completed > 1:
            squared_norm = values[2]
        eigenvalue = curvature / squared_norm
        if not math.isfinite(eigenvalue):
            break
        if product_norm == 0:
            converged = True  # H v = 0 v exactly
            break
        vector, advanced = torch._foreach_div(product, product_norm), True
        if abs(eigenvalue - previous) <= tolerance * abs(eigenvalue):  # False while previous is nan
            converged = True
            break
        previous = eigenvalue
    if not advanced:  # still the start vector
        torch._foreach_div_(vector, math.sqrt(squared_norm))
    return SharpnessEstimate(eigenvalue=eigenvalue, iterations=completed, converged=converged, vector=vector)


def krylov_top_eigenvalue(
    hvp: HVP,
    params: Sequence[Tensor],
    *,
    iterations: int = 20,
    tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
    initial: Sequence[Tensor] | None = None,
    reference: float | None = None,
) -> SharpnessEstimate:
    """Top Hessian eigenvalue by a Krylov (Lanczos) iteration on parameter-shaped tensors.

    After ``k`` products from the start vector ``v``, the estimate ``lambda_k`` is the
    largest Ritz value of the Krylov space ``span{v, Hv, ..., H^(k-1) v}``: the top
    eigenvalue of ``Q_k' H Q_k`` for an orthonormal basis ``Q_k`` of that space (each new
    product orthogonalised against the whole basis, as Arnoldi does, and the projected
    matrix symmetrised). The same products as power iteration, spent better: on a
    symmetric ``H`` no vector in the space has a higher Rayleigh quotient, the power
    iterates included, and where the top of the spectrum is crowded its error falls with
    ``k`` like ``1 / T_(k-1)(1 + 2 gap)^2`` (``T`` a Chebyshev polynomial; about
    ``exp(-4k sqrt(gap))`` for a small ``gap = (lambda_1 - lambda_2) / (lambda_2 - lambda_n)``)
    instead of like ``(lambda_2 / lambda_1)^(2k)`` (Kaniel-Paige). The stopping rule and the warm start are
    :func:`top_eigenvalue`'s: stop at ``|lambda_k - lambda_{k-1}| <= tolerance * |lambda_k|``
    with ``lambda_0 = reference``.

    The returned vector is ``H y / ||H y||`` for the top Ritz vector ``y``, one product
    past it as in :func:`top_eigenvalue`; ``H y`` is a combination of the basis and the
    last product, so it costs no product. A call that stops after its first product
    returns what power iteration would.

    Cost: per product, one dot with each basis vector, one update with each and two
    norms, in two host syncs (twice the dots and updates, and a third sync, where the
    product lies mostly in the basis' span and is orthogonalised again). During the call
    it holds the basis, up to ``iterations + 1`` parameter-sized vectors (power
    iteration: two).

    Args and the rest of the result: as :func:`top_eigenvalue`; ``converged`` is also
    ``True`` when a product falls into the basis' span (an invariant subspace: the
    estimate is then an exact eigenvalue of the symmetrised projection).
    """
    params = _validated_params(params)
    start, previous = _solver_start(params, iterations, tolerance, generator, initial, reference)
    start_norm = _global_norm(start).item()  # checked before any product is spent
    if start_norm == 0:
        raise ValueError("initial must be a nonzero vector")
    basis = [torch._foreach_div(start, start_norm)]
    del start
    # H Q_k = Q_{k+1} hessenberg[:k+1, :k]: column j holds the (j+1)-th product's
    # coefficients on the basis, and below them the norm of what is left.
    hessenberg = np.zeros((iterations + 1, iterations))
    eigenvalue = math.nan
    ritz = np.ones(1)
    converged = False
    completed = 0
    for completed in range(1, iterations + 1):
        product = _owned(hvp(basis[-1]), basis)  # orthogonalised in place below
        coefficients, residual, length = _orthogonalise(product, basis)
        if not (math.isfinite(residual) and all(math.isfinite(c) for c in coefficients)):
            eigenvalue = math.nan
            break
        # What is left of the product at the level of rounding: the basis spans an
        # invariant subspace (its next vector would be noise).
        invariant = residual <= _BREAKDOWN * torch.finfo(basis[0][0].dtype).eps * length
        hessenberg[:completed, completed - 1] = coefficients
        hessenberg[completed, completed - 1] = 0.0 if invariant else residual
        projected = hessenberg[:completed, :completed]
        values, vectors = np.linalg.eigh((projected + projected.T) / 2)
        eigenvalue, ritz = float(values[-1]), vectors[:, -1]
        if invariant:
            converged = True
            break
        torch._foreach_div_(product, residual)
        basis.append(product)
        if abs(eigenvalue - previous) <= tolerance * abs(eigenvalue):  # False while previous is nan
            converged = True
            break
        previous = eigenvalue
    if math.isnan(eigenvalue):
        vector = basis[-1]  # a unit vector: the start, or the last finite product
    else:
        # H y = Q_{k+1} (hessenberg s) for the Ritz vector y = Q_k s; y itself if H y = 0.
        weights = hessenberg[: len(basis), : len(ritz)] @ ritz
        if not np.any(weights):
            weights = np.zeros(len(basis))
            weights[: len(ritz)] = ritz
        vector = [torch.zeros_like(q) for q in basis[0]]
        for q, w in zip(basis, weights.tolist(), strict=True):
            torch._foreach_add_(vector, q, alpha=w)
        torch._foreach_div_(vector, _global_norm(vector).item())
    return SharpnessEstimate(eigenvalue=eigenvalue, iterations=completed, converged=converged, vector=vector)


_BREAKDOWN = 64
"""A product whose part outside the basis is under this many machine epsilons of its
length lies in the basis' span (Krylov breakdown)."""


def _owned(product: list[Tensor], basis: list[list[Tensor]]) -> list[Tensor]:
    """The product, copied where it shares memory with the basis (an HVP may hand back
    its input, or a view of it: the identity's ``lambda v: v``)."""
    held = {t.untyped_storage().data_ptr() for vector in basis for t in vector}
    return [h.detach().clone() if h.untyped_storage().data_ptr() in held else h.detach() for h in product]


def _orthogonalise(product: list[Tensor], basis: list[list[Tensor]]) -> tuple[list[float], float, float]:
    """Subtract from ``product``, in place, its components on the orthonormal ``basis``.

    Classical Gram-Schmidt, run a second time when the first removed most of the
    product (where rounding leaves the result visibly off orthogonal; "twice is
    enough"). Returns the coefficients removed, the norm of what is left and the
    product's length before (from the same sums, in two or three host syncs).
    """
    sums = torch.stack([*(_global_dot(q, product) for q in basis), _global_norm(product)]).tolist()
    coefficients, length = sums[:-1], sums[-1]
    for q, c in zip(basis, coefficients, strict=True):
        torch._foreach_add_(product, q, alpha=-c)
    residual = _global_norm(product).item()
    if residual < 0.5 * length:
        again = torch.stack([_global_dot(q, product) for q in basis]).tolist()
        for q, c in zip(basis, again, strict=True):
            torch._foreach_add_(product, q, alpha=-c)
        coefficients = [c + d for c, d in zip(coefficients, again, strict=True)]
        residual = _global_norm(product).item()
    return coefficients, residual, length


def lanczos_top_eigenvalue(
    hvp: HVP,
    params: Sequence[Tensor],
    *,
    tolerance: float = 1e-4,
    max_hvps: int | None = None,
) -> SharpnessEstimate:
    """Largest algebraic Hessian eigenvalue by Lanczos (the reference solver).

    ``lambda_max = max_v v'Hv / v'v``, computed by
    ``scipy.sparse.linalg.eigsh(H, k=1, which="LA", tol=tolerance)`` on the flattened
    operator in float64 (ARPACK's ``tol`` is the relative accuracy of the eigenvalue).
    Unlike :func:`top_eigenvalue` it is not fooled by large negative eigenvalues, but it
    moves every product through host memory, so it suits tests and small models.

    If ``max_hvps`` products run out first (or ARPACK does not converge), the result has
    ``converged=False`` and the largest Rayleigh quotient among the vectors tried, a
    lower bound on ``lambda_max``.
    """
    params = _validated_params(params)
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive finite number, got {tolerance!r}")
    if max_hvps is not None and (isinstance(max_hvps, bool) or not isinstance(max_hvps, int) or max_hvps < 1):
        raise ValueError(f"max_hvps must be None or an integer >= 1, got {max_hvps!r}")

    dimension = sum(p.numel() for p in params)
    count = 0
    best_eigenvalue, best_vector = -math.inf, np.zeros(dimension)

    def matvec(flat: np.ndarray) -> np.ndarray:
        nonlocal count, best_eigenvalue, best_vector
        if max_hvps is not None and count >= max_hvps:
            raise _BudgetSpent
        count += 1
        flat = np.asarray(flat, dtype=np.float64).reshape(-1)
        product = np.concatenate(
            [
                h.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
                for h in hvp(_unflatten(flat, params))
            ]
        )
        squared_norm = float(flat @ flat)
        if squared_norm > 0 and float(flat @ product) / squared_norm > best_eigenvalue:
            best_eigenvalue, best_vector = (
                float(flat @ product) / squared_norm,
                flat / math.sqrt(squared_norm),
            )
        return product

    try:
        if dimension == 1:  # ARPACK needs k < n
            values, vectors = np.array([matvec(np.ones(1))[0]]), np.ones((1, 1))
        else:
            operator = LinearOperator((dimension, dimension), matvec=matvec, dtype=np.float64)
            start = np.random.default_rng(_DEFAULT_SEED).standard_normal(dimension)
            values, vectors = eigsh(operator, k=1, which="LA", tol=tolerance, v0=start)
    except (_BudgetSpent, ArpackNoConvergence):
        return SharpnessEstimate(
            eigenvalue=best_eigenvalue,
            iterations=count,
            converged=False,
            vector=_unflatten(best_vector, params),
        )
    return SharpnessEstimate(
        eigenvalue=float(values[0]),
        iterations=count,
        converged=True,
        vector=_unflatten(vectors[:, 0], params),
    )


class _BudgetSpent(Exception):
    """Raised inside ARPACK's callback to stop it when ``max_hvps`` products are spent."""


def _validated_params(params: Sequence[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params must be a non-empty sequence of tensors")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(f"params[{i}] must be a tensor that requires grad")
    return params


def _check_like_params(vector: Sequence[Tensor], params: list[Tensor], name: str) -> None:
    if len(vector) != len(params) or any(v.shape != p.shape for v, p in zip(vector, params, strict=True)):
        raise ValueError(f"{name} must be a list of tensors shaped like params")


def _solver_start(
    params: list[Tensor],
    iterations: int,
    tolerance: float,
    generator: torch.Generator | None,
    initial: Sequence[Tensor] | None,
    reference: float | None,
) -> tuple[list[Tensor], float]:
    """Both solvers' arguments checked; their start vector (not normalised) and lambda_0,
    the estimate before it (``reference`` where a call carries an iteration on from
    ``initial``, else NaN, which no first product matches)."""
    _check_solver_arguments(iterations, tolerance, reference)
    previous = float(reference) if reference is not None and initial is not None else math.nan
    return _start_vector(params, generator, initial), previous


def _check_solver_arguments(iterations: int, tolerance: float, reference: float | None) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive finite number, got {tolerance!r}")
    if reference is not None and (
        isinstance(reference, bool) or not isinstance(reference, (int, float)) or not math.isfinite(reference)
    ):
        raise ValueError(f"reference must be a finite number or None, got {reference!r}")


def _start_vector(
    params: list[Tensor], generator: torch.Generator | None, initial: Sequence[Tensor] | None
) -> list[Tensor]:
    """A copy of ``initial`` in the params' devices and dtypes, or a standard normal draw."""
    if initial is not None:
        _check_like_params(initial, params, "initial")
        return [
            v.detach().to(device=p.device, dtype=p.dtype, copy=True)
            for v, p in zip(initial, params, strict=True)
        ]
    if generator is None:
        generator = torch.Generator().manual_seed(_DEFAULT_SEED)
    return [
        torch.randn(p.shape, generator=generator, device=generator.device).to(device=p.device, dtype=p.dtype)
        for p in params
    ]


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """``||[t_1, ..., t_n]||_2`` over all tensors, as a 0-dim tensor on the first one's device."""
    first = tensors[0]
    dtype = _common_dtype(tensors)
    norms = torch._foreach_norm(list(tensors))
    return torch.linalg.vector_norm(torch.stack([n.to(device=first.device, dtype=dtype) for n in norms]))


def _global_dot(left: Sequence[Tensor], right: Sequence[Tensor]) -> Tensor:
    """``sum_i <left_i, right_i>``, as a 0-dim tensor on the first tensor's device.

    Pairs of contiguous float32 or float64 tensors of one dtype go through ``torch.dot``,
    which reads both once; the others are multiplied, then summed in at least float32.
    """
    first = left[0]
    dtype = _common_dtype(left)
    terms = []
    for a, b in zip(left, right, strict=True):
        same = a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64)
        if same and a.is_contiguous() and b.is_contiguous():
            term = torch.dot(a.view(-1), b.view(-1))
        else:
            term = torch.mul(a, b).sum(dtype=dtype)
        terms.append(term.to(device=first.device, dtype=dtype))
    return torch.stack(terms).sum()


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = torch.float32  # accumulate low-precision (e.g. bfloat16) models in float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _unflatten(flat: np.ndarray, params: list[Tensor]) -> list[Tensor]:
    pieces = np.split(np.asarray(flat, dtype=np.float64), np.cumsum([p.numel() for p in params])[:-1])
    return [
        torch.from_numpy(np.ascontiguousarray(piece)).reshape(p.shape).to(device=p.device, dtype=p.dtype)
        for piece, p in zip(pieces, params, strict=True)
    ]
