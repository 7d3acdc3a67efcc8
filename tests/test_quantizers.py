"""StatsQ and LSQ arithmetic, gradients and state handling (pure tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from ofq_ray.quant import LsqQuantizer, StatsQuantizer
from ofq_ray.quant.quantizers import low_confidence


@pytest.mark.parametrize(
    ("bits", "levels"),
    [
        (2, [-1.5, -0.5, 0.5, 1.5]),
        (3, [-1.75, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.75]),
        (4, [(k + 0.5) / 8 * 2 for k in range(-8, 8)]),
    ],
)
def test_statsq_levels_are_the_spec_table(bits: int, levels: list[float]) -> None:
    # Rows with mean|w| = 1: the levels, in units of mean|w|, are the spec's section 2.1 table.
    torch.manual_seed(0)
    w = torch.randn(3, 4096)
    w = w / w.abs().mean(dim=1, keepdim=True)
    q = StatsQuantizer(bits)
    assert torch.allclose(q.scale(w), torch.full((3, 1), 2.0), atol=1e-5)
    got = torch.unique(torch.round(q(w) * 1e4) / 1e4).tolist()
    assert got == pytest.approx(levels, abs=1e-5)
    codes = q.codes(w)
    assert codes.dtype == torch.int8
    assert codes.min().item() == -(2 ** (bits - 1)) and codes.max().item() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_statsq_thresholds_sit_at_integer_multiples_of_the_step(bits: int) -> None:
    n = 2 ** (bits - 1)
    # One row whose mean|w| is exactly 1 (so s = 2 and the step is 2/n), then probe values just around
    # each threshold j * step: the code must change exactly there.
    step = 2.0 / n
    probes, expected = [], []
    for j in range(-(n - 1), n):
        for eps, code in ((-1e-3, j - 1), (1e-3, j)):
            probes.append(j * step + eps)
            expected.append(code)
    row = torch.tensor(probes, dtype=torch.float64)
    pad = len(probes) + 1 - row.abs().sum().item()  # one more value so that mean|row| == 1 exactly
    assert pad > 0
    full = torch.cat([row, torch.tensor([pad], dtype=torch.float64)])
    scale = StatsQuantizer(bits).scale(full[None])
    assert scale.item() == pytest.approx(2.0, abs=1e-6)
    codes = StatsQuantizer(bits).codes(full[None])[0, :-1].tolist()
    assert codes == expected


def test_statsq_clips_at_twice_the_mean_and_rounds_the_lower_edge_to_minus_n() -> None:
    w = torch.tensor([[10.0, -10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # s = 4
    codes = StatsQuantizer(2).codes(w)[0]
    assert codes[0].item() == 1 and codes[1].item() == -2


def test_statsq_gradient_is_identity_including_clipped_weights() -> None:
    w = torch.tensor([[5.0, -5.0, 0.1, -0.2, 0.3]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    StatsQuantizer(2)(w).backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_statsq_scale_has_no_gradient_path() -> None:
    w = torch.randn(4, 16, requires_grad=True)
    out = StatsQuantizer(3)(w)
    (grad,) = torch.autograd.grad(out.sum(), w)
    assert torch.equal(grad, torch.ones_like(w))  # a path through s would add terms


def test_statsq_boundary_range_masks_gradient_of_confident_entries_only_in_training() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64, requires_grad=True)
    q = StatsQuantizer(2)
    q.boundary_range = 0.05
    (grad,) = torch.autograd.grad(q(w).sum(), w)
    trainable = low_confidence(q.prequant(w), 0.05)
    assert torch.equal(grad, trainable.float())
    assert 0 < trainable.float().mean().item() < 0.3
    q.eval()
    (grad,) = torch.autograd.grad(q(w).sum(), w)
    assert torch.equal(grad, torch.ones_like(w))


@pytest.mark.parametrize("bits", [1, 9, 2.0, True, None])
def test_bad_bits_are_one_line_errors(bits: object) -> None:
    with pytest.raises(ValueError, match=r"^bits: .* allowed: an integer from 2 to 8$"):
        StatsQuantizer(bits)  # type: ignore[arg-type]


def _reference_lsq(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """LSQ written with plain autograd (the textbook formulation) to check the fused function."""
    step = step * g + (step - step * g).detach()
    v = (x / step).clamp(qn, qp)
    return (v + (v.round() - v).detach()) * step


@pytest.mark.parametrize(
    ("granularity", "shape", "step_shape", "per_group"),
    [
        ("token", (4, 7, 5), (1, 7, 1), 4 * 5),  # per token for [B, N, C]: g uses B*C
        ("channel", (4, 7, 5), (1, 1, 5), 4 * 7),  # per channel (V): g uses B*N
        ("tensor", (4, 5), (1, 1), 20),
        ("query", (2, 3, 6, 6), (1, 1, 6, 1), 2 * 3 * 6),  # attention rows: g uses B*H*N'
        ("token", (2, 3, 6, 5), (1, 3, 6, 1), 2 * 5),  # per (head, token) for [B, H, N, C]
    ],
)
def test_lsq_init_shapes_gradient_scale_and_gradients(
    granularity: str, shape: tuple[int, ...], step_shape: tuple[int, ...], per_group: int
) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    q = LsqQuantizer(3, signed=True, granularity=granularity)  # type: ignore[arg-type]
    q.init_from(x)
    assert tuple(q.step.shape) == step_shape
    reduce = [d for d, s in enumerate(step_shape) if s == 1]
    expected = 2 * x.abs().mean(dim=reduce, keepdim=True) / math.sqrt(3)
    assert torch.allclose(q.step.double(), expected, rtol=1e-6)
    assert q.grad_scale(x) == pytest.approx(1 / math.sqrt(3 * per_group))

    step = q.step.detach().double().clone().requires_grad_()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    q.step.data = step.detach().clone()
    step_fused = q.step
    upstream = torch.randn(shape, dtype=torch.float64)
    q.quantize(x1).backward(upstream)
    _reference_lsq(x2, step, q.qn, q.qp, q.grad_scale(x)).backward(upstream)
    assert torch.allclose(x1.grad, x2.grad)
    assert torch.allclose(step_fused.grad, step.grad)


def test_lsq_unsigned_grid_and_init() -> None:
    x = torch.rand(2, 3, 4, 4)
    q = LsqQuantizer(2, signed=False, granularity="query")
    assert (q.qn, q.qp) == (0, 3)
    out = q(x)
    assert torch.allclose(q.step, 4 * x.mean(dim=(0, 1, 3), keepdim=True) / math.sqrt(3))
    assert out.min() >= 0
    assert torch.unique(torch.round(out / q.step)).numel() <= 4


def test_lsq_shifts_wrap_the_quantizer_and_learn() -> None:
    x = torch.randn(2, 3, 4)
    q = LsqQuantizer(4, granularity="token", shift_shape=(4,))
    q.init_from(x)
    with torch.no_grad():
        q.shift_before.fill_(0.3)
        q.shift_after.fill_(-0.1)
    out = q(x)
    assert torch.allclose(out, q.quantize(x + 0.3) - 0.1)
    out.sum().backward()
    assert q.shift_before.grad is not None and q.shift_after.grad is not None
    assert torch.allclose(q.shift_after.grad, torch.full((4,), 6.0))


def test_lsq_is_created_lazily_by_the_first_batch_and_then_trains() -> None:
    q = LsqQuantizer(2)
    assert not q.initialized
    x = torch.randn(2, 3, 4)
    q(x)
    assert q.initialized and q.step.shape == (1, 3, 1)
    before = q.step.detach().clone()
    optimizer = torch.optim.SGD(q.parameters(), lr=0.1)
    (q(x) - 2 * x).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(before, q.step.detach())


def test_lsq_state_dict_loads_into_a_fresh_uninitialized_quantizer() -> None:
    q = LsqQuantizer(3, shift_shape=(4,))
    x = torch.randn(2, 5, 4)
    q(x)
    fresh = LsqQuantizer(3, shift_shape=(4,))
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialized
    assert torch.equal(fresh(x), q(x))


def test_lsq_quantizes_half_precision_in_float32() -> None:
    x = torch.randn(2, 8, 16) * 3
    q = LsqQuantizer(8)
    q.init_from(x)
    out = q(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    codes = torch.round(q.quantize(x.to(torch.bfloat16).float()) / q.step)
    assert torch.equal(codes, torch.round(out.float() / q.step))


def test_lsq_gradient_of_step_floor_is_straight_through() -> None:
    q = LsqQuantizer(2, granularity="tensor")
    x = torch.randn(3, 4)
    q.init_from(x)
    q.step.data.fill_(1e-9)  # below the 1e-5 floor
    q(x).sum().backward()
    assert q.step.grad is not None and q.step.grad.abs().item() > 0


def test_replicas_make_the_gradient_scale_count_the_global_batch() -> None:
    x = torch.randn(8, 5, 4)
    q = LsqQuantizer(2)
    q.init_from(x)
    single = q.grad_scale(x)
    q.replicas = 4  # four workers with 8 each = a global batch of 32
    assert q.grad_scale(x) == pytest.approx(single / 2)
    one_worker = LsqQuantizer(2)
    one_worker.init_from(torch.randn(32, 5, 4))
    assert q.grad_scale(x) == pytest.approx(one_worker.grad_scale(torch.randn(32, 5, 4)))
