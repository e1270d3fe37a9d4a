"""Hessian-vector products by every method against dense float64 Hessians; ``method="auto"``; what the operator
must tolerate (unused parameters, in-place forwards, bad losses, iterables of batches)."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _reference import ce_loss, dense_eigvalsh, dense_hessian, digits, mlp
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    HessianOperator,
    MultiBatch,
    gradient_covariance,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
)
from lightning_curvature.core import hvp as hvp_module
from lightning_curvature.core._batch import looks_like_several_batches

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _relu_cnn(dtype: torch.dtype) -> tuple[nn.Module, Any, Any]:
    """ReLU + max-pool: the gradient jumps at the kinks, where plain central differences go wrong."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 10)
    ).to(dtype)
    x, y = digits(48, dtype=dtype)
    return net, lambda m, b: F.cross_entropy(m(b[0].view(-1, 1, 8, 8)), b[1]), (x, y)


def _tanh_mlp(dtype: torch.dtype) -> tuple[nn.Module, Any, Any]:
    return mlp(hidden=6, dtype=dtype), ce_loss, digits(48, dtype=dtype)


CASES = {"tanh-mlp": _tanh_mlp, "relu-cnn": _relu_cnn}
_DENSE: dict[str, Tensor] = {}


def _dense(name: str) -> Tensor:
    if name not in _DENSE:  # the dense reference is the slow part: once per case
        model, loss_fn, batch = CASES[name](torch.float64)
        _DENSE[name] = dense_hessian(model, loss_fn, batch)
    return _DENSE[name]


def _rel(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fd_order", [4, 2])
def test_finite_difference_products_in_float32_match_the_float64_hessian(name: str, fd_order: int) -> None:
    H = _dense(name)
    model32, loss_fn, batch32 = CASES[name](torch.float32)
    _, evecs = torch.linalg.eigh(H)
    g = torch.Generator().manual_seed(0)
    directions = {"random": torch.randn(H.shape[0], dtype=torch.float64, generator=g), "top": evecs[:, -1]}
    limit = 1e-4 if fd_order == 4 else 5e-4
    with HessianOperator(model32, loss_fn, batch32, method="finite_difference", fd_order=fd_order) as Hop:
        for label, v in directions.items():
            got = Hop.matvec(v.float())
            assert _rel(got, H @ v) < limit, (label, _rel(got, H @ v))


def test_without_the_frozen_pattern_central_differences_are_wrong_on_relu_nets() -> None:
    """The reason for :mod:`_frozen_kinks`: the gradient's jumps at ReLU/max-pool kinks bias the difference.

    With the step search the jumps show as a large error estimate and the search shrinks the step below the
    nearest kink, at several times the cost: the frozen pattern gets the accuracy at the first step."""
    H = _dense("relu-cnn")
    model32, loss_fn, batch32 = _relu_cnn(torch.float32)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with HessianOperator(model32, loss_fn, batch32, method="finite_difference") as Hop:
        frozen = _rel(Hop.matvec(v.float()), H @ v)
        Hop.freeze_kinks = False
        searched = _rel(Hop.matvec(v.float()), H @ v)
        searched_error = Hop.product_error
    with pytest.MonkeyPatch.context() as mp:  # the first step only, as before the search
        mp.setattr(hvp_module, "FD_TARGET", math.inf)
        with HessianOperator(model32, loss_fn, batch32, method="finite_difference") as Hop:
            Hop.freeze_kinks = False
            first_step = _rel(Hop.matvec(v.float()), H @ v)
    assert frozen < 1e-4 < 1e-2 < first_step
    assert searched <= searched_error


def test_forward_over_reverse_and_double_backward_match_the_dense_hessian() -> None:
    model, loss_fn, batch = _tanh_mlp(torch.float64)
    H = _dense("tanh-mlp")
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for method in ("double_backward", "forward_over_reverse", "finite_difference"):
        hv = hessian_vector_product(model, loss_fn, batch, v, method=method)
        tol = 1e-10 if method != "finite_difference" else 1e-7
        assert _rel(hv, H @ v) < tol, method


def test_an_open_operator_refuses_a_nested_entry_and_still_restores_the_model() -> None:
    """Entering the same operator twice replaced the state its outer entry restores: after both exits the model
    stayed in the measurement's state (here: eval mode and the forked RNG were never undone)."""
    model = mlp(hidden=4).train()
    batch = digits(16)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    H = HessianOperator(model, ce_loss, batch, mode="eval")
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with H:
        with pytest.raises(RuntimeError, match="already entered"):
            with H:
                pass
        first = H.matvec(v)  # the outer entry still works
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    with H:  # and the operator can be entered again once closed: the same product
        torch.testing.assert_close(H.matvec(v), first, rtol=1e-12, atol=0)
    torch.testing.assert_close(first, dense_hessian(model, ce_loss, batch) @ v, rtol=1e-9, atol=1e-12)


def test_forward_over_reverse_runs_through_batchnorm_in_train_mode() -> None:
    """BatchNorm updates its running statistics in place during the forward; inside torch.func's transforms that
    was an error ("mutate a captured Tensor"). Each evaluation now updates copies made inside the transform: the
    product equals the dense Hessian's (batch statistics), and the model's buffers are untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 10)).double().train()
    batch = digits(48)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    H = dense_hessian(model, ce_loss, batch)
    model.load_state_dict({**model.state_dict(), **buffers})  # the reference's forwards updated them
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hv = hessian_vector_product(model, ce_loss, batch, v, method="forward_over_reverse")
    assert _rel(hv, H @ v) < 1e-10
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


class _DetachedTanh(torch.autograd.Function):
    """tanh whose backward uses a detached saved output: double backward silently drops σ''."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y.detach() ** 2)


class _CustomOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 16)
        self.b = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(_DetachedTanh.apply(self.a(x)))


class _PlainNet(_CustomOpNet):
    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_auto_detects_a_silently_wrong_double_backward_and_uses_finite_differences() -> None:
    x, y = digits(64, dtype=torch.float32)
    batch = (x, y)
    ref = dense_eigvalsh(_PlainNet(), batch)[:3]  # the true Hessian: plain tanh, float64, dense
    wrong = hessian_eigenvalues(_CustomOpNet(), ce_loss, batch, k=3, tol=1e-6, method="double_backward")
    assert wrong.converged and float((wrong.eigenvalues - ref).abs().max() / ref[0]) > 0.02  # the silent failure
    with pytest.warns(RuntimeWarning, match="differ from finite differences"):
        auto = hessian_eigenvalues(_CustomOpNet(), ce_loss, batch, k=3, tol=1e-6)
    assert auto.method == "finite_difference"
    torch.testing.assert_close(auto.eigenvalues, ref, rtol=1e-4, atol=0)


class _CheckpointedNet(_CustomOpNet):
    """The plain tanh net with its first layer under (non-reentrant) activation checkpointing."""

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False)
        return self.b(h)


@pytest.mark.parametrize("method", ["auto", "double_backward", "finite_difference"])
def test_activation_checkpointing_gives_the_hessian_of_the_plain_network(method: str) -> None:
    """Checkpointing re-runs the first layer during the backward; finite differences used to evaluate that re-run
    at the unshifted parameters (0.4% off, and ``auto`` then judged the exact products wrong and switched)."""
    x, y = digits(64, dtype=torch.float32)
    ref = dense_eigvalsh(_PlainNet(), (x, y))[:3]  # the same weights, no checkpointing, float64
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "differ from finite differences" warning
        res = hessian_eigenvalues(_CheckpointedNet(), ce_loss, (x, y), k=3, tol=1e-6, method=method)
    assert res.method == ("double_backward" if method == "auto" else method)
    torch.testing.assert_close(res.eigenvalues, ref, rtol=2e-5, atol=0)
    model = _CheckpointedNet()
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(1))
    H = dense_hessian(_PlainNet().double(), ce_loss, (x.double(), y))
    with HessianOperator(model, ce_loss, (x, y), method=method) as op:
        hv = op.matvec(v)
    assert _rel(hv.double(), H @ v.double()) < 1e-4


class _ReentrantCheckpointedNet(_CustomOpNet):
    """The plain tanh net with its second layer under reentrant checkpointing (its input requires grad)."""

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.b, torch.tanh(self.a(x)), use_reentrant=True)


def test_reentrant_checkpointing_is_measured_by_finite_differences_of_backward_gradients() -> None:
    """``use_reentrant=True`` refuses ``torch.autograd.grad`` (every method failed); gradients now come from
    ``loss.backward()`` with every parameter's own ``.grad`` set aside and put back."""
    x, y = digits(64, dtype=torch.float32)
    ref = dense_eigvalsh(_PlainNet(), (x, y))[:3]
    model = _ReentrantCheckpointedNet()
    ce_loss(model, (x, y)).backward()  # the user's own gradients, as inside training
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    # the double backward through a reentrant segment is refused, or (a segment at the end, as here) runs and drops
    # the segment's second derivatives (97% off on the probe): either way auto uses finite differences
    with pytest.warns(RuntimeWarning, match="differ from finite differences|Double backward is not available"):
        auto = hessian_eigenvalues(model, ce_loss, (x, y), k=3, tol=1e-4)
    assert auto.method == "finite_difference"
    torch.testing.assert_close(auto.eigenvalues, ref, rtol=1e-4, atol=0)
    subset = hessian_eigenvalues(model, ce_loss, (x, y), k=1, tol=1e-4, params=[model.b.weight], method="auto")
    H = dense_hessian(_PlainNet().double(), ce_loss, (x.double(), y))
    block = H[16 * 64 + 16 : 16 * 64 + 16 + 160, 16 * 64 + 16 : 16 * 64 + 16 + 160]  # b.weight's principal block
    assert abs(float(subset.eigenvalues[0]) - float(torch.linalg.eigvalsh(block)[-1])) <= 1e-4 * float(block.norm())
    plain = gradient_covariance(_PlainNet(), ce_loss, (x, y), k=3)
    with pytest.warns(RuntimeWarning, match="per-example loop"):
        cov = gradient_covariance(model, ce_loss, (x, y), k=3)
    torch.testing.assert_close(cov.eigenvalues, plain.eigenvalues, rtol=1e-5, atol=0)
    for p, (obj, value) in zip(model.parameters(), grads):
        assert p.grad is obj and torch.equal(p.grad, value)  # the very tensors, untouched


def test_the_check_of_unused_parameters_is_paid_once_per_model_and_loss() -> None:
    """An unused parameter may be one reentrant checkpointing hides from ``torch.autograd.grad``: the first
    gradient is evaluated again by a backward to tell; the answer is kept for later measurements of the model."""

    class Counting(_UnusedHead):
        calls = 0

        def forward(self, x: Tensor) -> Tensor:
            Counting.calls += 1
            return super().forward(x)

    model = Counting().double()
    batch = digits(32)
    ref = torch.linalg.eigvalsh(dense_hessian(model, _unused_loss, batch)).max()
    for expected in (2, 1, 1):
        Counting.calls = 0
        res = hessian_eigenvalues(model, _unused_loss, batch, k=1, tol=1e-8, method="double_backward")
        assert Counting.calls == expected
        torch.testing.assert_close(res.eigenvalues[0], ref, rtol=1e-7, atol=0)


def test_auto_gives_the_true_hessian_of_a_weight_normalised_layer() -> None:
    """``torch._weight_norm`` fails ``gradgradcheck`` on the CPU (torch 2.13): the double-backward Hessian of a
    ``parametrizations.weight_norm`` layer is off by ~1e-3 relative with ``converged=True``. The reference writes
    the layer out by hand, ``W = g·v/‖v‖`` row by row, in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 8)), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    named = {n: p.detach().double() for n, p in model.named_parameters()}
    names, shapes = list(named), [p.shape for p in named.values()]

    def by_hand(w: Tensor) -> Tensor:
        d = {n: c.view(s) for n, c, s in zip(names, torch.split(w, [math.prod(s) for s in shapes]), shapes)}
        g, v = d["0.parametrizations.weight.original0"], d["0.parametrizations.weight.original1"]
        h = torch.tanh(x.double() @ (g * v / v.norm(dim=1, keepdim=True)).T + d["0.bias"])
        return F.cross_entropy(h @ d["2.weight"].T + d["2.bias"], y)

    H = torch.autograd.functional.hessian(by_hand, torch.cat([p.reshape(-1) for p in named.values()]))
    ref = torch.linalg.eigvalsh(H).flip(0)[:3]
    exact = hessian_eigenvalues(model, ce_loss, (x, y), k=3, tol=1e-6, method="double_backward")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        auto = hessian_eigenvalues(model, ce_loss, (x, y), k=3, tol=1e-4)
    torch.testing.assert_close(auto.eigenvalues.double(), ref, rtol=1e-4, atol=0)
    if _rel(exact.eigenvalues, ref) > 1e-4:  # PyTorch's double backward is wrong here: auto must have seen it
        assert auto.method == "finite_difference"


def test_auto_keeps_double_backward_where_it_is_valid_and_says_so() -> None:
    for name, make in CASES.items():
        model, loss_fn, batch = make(torch.float32)
        res = hessian_eigenvalues(model, loss_fn, batch, k=1)
        assert res.method == "double_backward", name
        trace = hessian_trace(model, loss_fn, batch, num_samples=6)
        assert trace.num_hvp == 6  # the validity check is not counted as the estimator's products


class _UnusedHead(nn.Module):
    """A head used only in validation, and a bias whose gradient does not depend on the parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(64, 10)
        self.val_head = nn.Linear(10, 2)
        self.offset = nn.Parameter(torch.zeros(10))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _unused_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y) + (model.offset * 0.1).sum()  # constant gradient: zero Hessian row


@pytest.mark.parametrize("method", ["double_backward", "finite_difference", "auto"])
def test_unused_and_constant_gradient_parameters_have_zero_hessian_rows(method: str) -> None:
    model = _UnusedHead().double()
    batch = digits(32)
    if "unused" not in _DENSE:
        _DENSE["unused"] = dense_hessian(model, _unused_loss, batch)
    H = _DENSE["unused"]
    ref = torch.linalg.eigvalsh(H).flip(0)[:3]
    res = hessian_eigenvalues(model, _unused_loss, batch, k=3, tol=1e-7, method=method)
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-6, atol=1e-10)
    tr = hessian_trace(model, _unused_loss, batch, num_samples=30, method=method)
    assert abs(tr.estimate - float(torch.trace(H))) <= 4 * tr.std_error + 1e-8


class _EmbeddingNet(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 6, sparse=sparse)
        self.head = nn.Linear(6, 12)

    def forward(self, t: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(t)))


@pytest.mark.parametrize("method", ["auto", "double_backward", "finite_difference"])
def test_sparse_embedding_gradients_are_measured_as_the_dense_ones(method: str) -> None:
    """``nn.Embedding(sparse=True)`` returns sparse gradients (every method failed with "reshape is not
    implemented for sparse tensors"); the curvature is the dense embedding's."""
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 12, (40,), generator=gen), torch.randint(0, 12, (40,), generator=gen))
    ref = torch.linalg.eigvalsh(dense_hessian(_EmbeddingNet(False).double(), ce_loss, batch)).flip(0)[:2]
    res = hessian_eigenvalues(_EmbeddingNet(True), ce_loss, batch, k=2, tol=1e-6, method=method)
    torch.testing.assert_close(res.eigenvalues.double(), ref, rtol=1e-4, atol=0)
    assert res.method == ("double_backward" if method == "auto" else method)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_sparse_embedding_gradients_in_the_trace_and_the_covariance() -> None:
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 12, (24,), generator=gen), torch.randint(0, 12, (24,), generator=gen))
    H = dense_hessian(_EmbeddingNet(False).double(), ce_loss, batch)
    tr = hessian_trace(_EmbeddingNet(True), ce_loss, batch, num_samples=30)
    assert abs(tr.estimate - float(torch.trace(H))) <= 4 * tr.std_error
    dense = gradient_covariance(_EmbeddingNet(False), ce_loss, batch, k=3)
    with pytest.warns(RuntimeWarning, match="per-example loop"):  # vmap cannot trace sparse gradients
        sparse = gradient_covariance(_EmbeddingNet(True), ce_loss, batch, k=3)
    torch.testing.assert_close(sparse.eigenvalues, dense.eigenvalues, rtol=1e-5, atol=0)


def test_a_failing_loss_is_raised_as_is_not_blamed_on_the_double_backward() -> None:
    """``auto`` used to read any error of its first exact product as "double backward is not available", warn,
    and then fail with the same error in the finite-difference products."""

    def broken(model: nn.Module, batch: Any) -> Tensor:
        raise RuntimeError("the user's own bug")

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeError, match="the user's own bug"):
            hessian_eigenvalues(_PlainNet(), broken, digits(8, dtype=torch.float32), k=1)


def test_a_half_precision_model_whose_loss_casts_to_its_dtype_gets_a_note_naming_the_compute_dtype() -> None:
    model = _PlainNet().to(torch.bfloat16)
    x, y = digits(16, dtype=torch.float32)

    def casts(model: nn.Module, batch: Any) -> Tensor:
        return F.cross_entropy(model(batch[0].bfloat16()).float(), batch[1])

    with pytest.raises(RuntimeError, match="dtype") as info:
        hessian_eigenvalues(model, casts, (x, y), k=1)
    if sys.version_info >= (3, 11):
        assert any("measured in torch.float32 copies" in note for note in info.value.__notes__)

    def follows(model: nn.Module, batch: Any) -> Tensor:
        return F.cross_entropy(model(batch[0].to(next(model.parameters()).dtype)).float(), batch[1])

    ref = dense_eigvalsh(_PlainNet().to(torch.bfloat16).double(), (x, y))[:1]  # the bf16 weights, in float64
    res = hessian_eigenvalues(model, follows, (x, y), k=1, tol=1e-5)
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-4, atol=0)


def test_a_forward_that_writes_its_weights_in_place_leaves_the_parameters_bit_identical() -> None:
    """nn.Embedding(max_norm=...) renormalises rows of its weight inside the forward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8, max_norm=0.5), nn.Flatten(), nn.Linear(8 * 4, 3))
    with torch.no_grad():
        model[0].weight.mul_(5.0)  # rows above max_norm: the forward would shrink them
    before = [p.detach().clone() for p in model.parameters()]
    tokens = torch.randint(0, 20, (16, 4), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    for method in ("double_backward", "finite_difference"):
        hessian_eigenvalues(model, ce_loss, (tokens, labels), k=2, method=method)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), method


@pytest.mark.parametrize(
    ("loss_fn", "error", "match"),
    [
        (lambda m, b: ce_loss(m, b).detach(), ValueError, "does not depend on the parameters"),
        (lambda m, b: torch.tensor(ce_loss(m, b).item()), ValueError, "does not depend on the parameters"),
        (lambda m, b: m(b[0]).sum(1), TypeError, "scalar"),
        (lambda m, b: ce_loss(m, b).round().long(), TypeError, "floating-point"),
        (lambda m, b: "loss", TypeError, "scalar tensor"),
    ],
    ids=["detached", "item", "non-scalar", "integer", "string"],
)
def test_a_bad_loss_is_a_clear_error(loss_fn: Any, error: type, match: str) -> None:
    model = mlp(dtype=torch.float32)
    with pytest.raises(error, match=match):
        hessian_eigenvalues(model, loss_fn, digits(8, dtype=torch.float32))


def test_a_loss_computed_under_no_grad_is_a_clear_error() -> None:
    def no_grad_loss(m: nn.Module, b: Any) -> Tensor:
        with torch.no_grad():
            return ce_loss(m, b)

    with pytest.raises(ValueError, match="no_grad"):
        hessian_eigenvalues(mlp(dtype=torch.float32), no_grad_loss, digits(8, dtype=torch.float32))


def test_a_dataloader_is_one_curvature_batch_averaged_by_size() -> None:
    model = mlp(hidden=4)
    x, y = digits(90)
    H = dense_hessian(model, ce_loss, (x, y))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)  # 32 + 32 + 26: weighted by size
    res = hessian_eigenvalues(model, ce_loss, loader, k=3, tol=1e-9, method="double_backward")
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:3], rtol=1e-8, atol=0)
    fd = hessian_eigenvalues(model, ce_loss, loader, k=1, tol=1e-7, method="finite_difference")
    torch.testing.assert_close(fd.eigenvalues[0], torch.linalg.eigvalsh(H)[-1], rtol=1e-6, atol=0)
    with pytest.warns(RuntimeWarning, match="shuffle"):
        hessian_eigenvalues(model, ce_loss, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), k=1)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_a_list_of_batches_fails_in_the_loss_with_a_note_naming_multibatch() -> None:
    """A list is one batch (a batch may be any nesting of containers); a list of (x, y) pairs fails in the user's
    loss, and the error says how to pass several batches. The same batches as a MultiBatch give the full batch's
    Hessian; an error on an ordinary batch gets no note."""
    model = mlp(hidden=4)
    x, y = digits(40)
    pairs = [(x[:20], y[:20]), (x[20:], y[20:])]
    with pytest.raises(TypeError) as caught:
        hessian_eigenvalues(model, ce_loss, pairs, k=1, method="double_backward")
    assert any("MultiBatch" in note for note in getattr(caught.value, "__notes__", []))
    res = hessian_eigenvalues(model, ce_loss, MultiBatch(pairs), k=1, tol=1e-9, method="double_backward")
    H = dense_hessian(model, ce_loss, (x, y))
    torch.testing.assert_close(res.eigenvalues[0], torch.linalg.eigvalsh(H)[-1], rtol=1e-8, atol=0)

    def broken(m: nn.Module, b: Any) -> Tensor:
        raise TypeError("the user's own bug")

    with pytest.raises(TypeError, match="own bug") as caught:
        hessian_eigenvalues(model, broken, (x, y), k=1)
    assert not getattr(caught.value, "__notes__", [])


def test_only_lists_of_two_or_more_containers_of_tensors_look_like_several_batches() -> None:
    x, y = torch.zeros(3, 2), torch.zeros(3)
    assert looks_like_several_batches([(x, y), (x, y)])
    assert looks_like_several_batches(({"x": x}, {"x": x}))
    assert not looks_like_several_batches([x, y])  # an ordinary (x, y) batch
    assert not looks_like_several_batches([(x, y)])  # one container: a nested batch
    assert not looks_like_several_batches(((x, x), y))  # nested inputs and a target
    assert not looks_like_several_batches(MultiBatch([(x, y), (x, y)]))
    assert not looks_like_several_batches([("a", 1), ("b", 2)])  # containers without tensors


def test_the_operators_loss_is_the_mean_loss_of_the_curvature_batch() -> None:
    """Read from the double-backward graphs (one per physical batch, no forward of its own) or by a forward pass
    (finite differences): the size-weighted mean over the batches, against the float64 loss of all examples."""
    model = mlp(hidden=4)
    x, y = digits(90)
    reference = float(ce_loss(copy.deepcopy(model).double(), (x.double(), y)))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)  # 32 + 32 + 26
    for method in ("double_backward", "finite_difference"):
        with HessianOperator(model, ce_loss, loader, method=method, reuse_graph=True) as H:
            forwards = H.num_grad
            assert H.loss() == pytest.approx(reference, rel=1e-6)
            if method == "double_backward":
                assert H.num_grad == forwards == 3  # the three graphs, built at entry, carry the loss


def test_a_generator_of_batches_is_read_once() -> None:
    model = mlp(hidden=4)
    x, y = digits(64)
    whole = dense_eigvalsh(model, (x, y))[:2]
    gen = ((x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16))
    torch.testing.assert_close(
        hessian_eigenvalues(model, ce_loss, gen, k=2, tol=1e-9, method="double_backward").eigenvalues,
        whole,
        rtol=1e-9,
        atol=0,
    )


def test_the_step_is_a_fraction_of_the_parameters_the_direction_lives_in() -> None:
    from lightning_curvature.core.vectors import VectorSpace

    space = VectorSpace([torch.empty(1000), torch.empty(10)])
    theta = [torch.full((1000,), 0.1), torch.full((10,), 3.0)]
    spread = [torch.ones(1000), torch.ones(10)]
    on_head = [torch.zeros(1000), torch.ones(10)]
    assert hvp_module.direction_scale(space, theta, on_head) == pytest.approx(3.0 * 10**0.5, rel=1e-6)
    # a direction spread over everything sees about the norm of all parameters
    full = (1000 * 0.01 + 10 * 9.0) ** 0.5
    assert hvp_module.direction_scale(space, theta, spread) == pytest.approx(full, rel=1e-6)
