"""Backend dispatch: the defaults follow the benchmark table, APSFAST_BACKEND forces one backend
for every public function (and never falls back), backends keep to their imports, and whole
supernets agree across backends."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

import apsfast
from apsfast import _backends, _order
from cases import ALL, TRITON_INTERPRETED, TRITON, randn, transform

ROOT = Path(__file__).resolve().parents[1]
OPS = ("construct", "construct_backward", "construct_grouped", "sharing_level", "sharing_level_backward",
       "transition_step_all")


@pytest.fixture
def unforced(scoped):
    scoped.delenv(_backends.ENV_VAR)


def test_cpu_defaults(unforced):
    cpu, f32 = torch.device("cpu"), torch.float32
    compiled = "apsfast._backends.cpu" if "cpu" in apsfast.backends() else "apsfast.reference"
    for op in ("transition_step_all", "construct_grouped"):
        assert _backends.select(op, cpu, f32).__name__ == compiled
    # The C++ construction of one layer only ties the reference on CPU, so it is not the
    # default; Φ of one layer has no compiled kernel.
    for op in ("construct", "construct_backward", "sharing_level", "sharing_level_backward"):
        assert _backends.select(op, cpu, f32).__name__ == "apsfast.reference"
    # No compiled backend for a dtype it does not serve.
    assert _backends.select("transition_step_all", cpu, torch.float16).__name__ == "apsfast.reference"


def test_forced_backend_serves_every_op(scoped):
    if "cpu" not in apsfast.backends():
        pytest.skip("the CPU extension is not built")
    scoped.setenv(_backends.ENV_VAR, "cpu")
    for op in OPS:
        assert _backends.select(op, torch.device("cpu"), torch.float64).__name__ == "apsfast._backends.cpu"
    with pytest.raises(_backends.BackendUnavailable,
                       match="cannot run construct on cpu tensors of dtype torch.float16"):
        _backends.select("construct", torch.device("cpu"), torch.float16)


def test_forced_backend_never_falls_back(scoped):
    weight, P, Q = randn(8, 6, 3, 3, dtype=torch.float32), transform(8, 5, dtype=torch.float32), None
    scoped.setenv(_backends.ENV_VAR, "cuda")  # not built without a CUDA torch
    if "cuda" not in apsfast.backends():
        with pytest.raises(_backends.BackendUnavailable, match="APSFAST_BACKEND=cuda"):
            apsfast.construct(weight, P, Q)
        with pytest.raises(_backends.BackendUnavailable, match="APSFAST_BACKEND=cuda"):
            apsfast.sharing_level([P], None)
    if "cpu" in apsfast.backends():
        # A built backend that does not serve the dtype raises too (it used to fall back).
        scoped.setenv(_backends.ENV_VAR, "cpu")
        with pytest.raises(_backends.BackendUnavailable, match="cannot run sharing_level"):
            apsfast.sharing_level([P.half()], None)
        with pytest.raises(_backends.BackendUnavailable, match="cannot run transition_step_all"):
            apsfast.transition_step([P.half()], None, 1e-3)
    scoped.setenv(_backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="APSFAST_BACKEND must be one of"):
        apsfast.construct(weight, P, Q)


# --- forcing a backend reaches its op from every public function --------------------------------

class Spy:
    """Stands in for a backend's op function and records that it ran."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _public_calls(device):
    """(public call, the ops it must reach) pairs, on tiny float32 inputs."""
    dt = torch.float32

    def layer():
        w = randn(6, 4, 3, 3, dtype=dt).to(device).requires_grad_()
        return w, transform(6, 3, 1, dt).to(device), transform(4, 2, 2, dt).to(device)

    def construct():
        w, P, Q = layer()
        apsfast.construct(w, P, Q).sum().backward()

    def aps_conv2d():
        w, P, Q = layer()
        apsfast.aps_conv2d(randn(1, 2, 5, 5, dtype=dt).to(device), w, P, Q).sum().backward()

    def construct_grouped():
        w, P, Q = layer()
        sum(k.sum() for k in apsfast.construct_grouped([w], [P], [Q])).backward()

    def sharing_level():
        Ps = [transform(6, c, c, dt).to(device).requires_grad_() for c in (2, 4)]
        apsfast.sharing_level(Ps, [transform(4, 2, 7, dt).to(device)]).backward()

    def transition_step():
        apsfast.transition_step([transform(6, c, c, dt).to(device) for c in (2, 4)], None, 1e-3)

    def transition_step_all():
        apsfast.transition_step_all([([transform(6, 2, 1, dt).to(device)], [transform(4, 3, 2, dt).to(device)])],
                                    1e-3)

    def layer_methods():
        conv = apsfast.nn.APSConv2d((2, 4), (2, 3), 3, sharing="transitional").to(device)
        conv.sharing_level()
        conv.transition_step(1e-3, relative=True)

    return [(construct, {"construct", "construct_backward"}), (aps_conv2d, {"construct", "construct_backward"}),
            (construct_grouped, {"construct_grouped"}), (sharing_level, {"sharing_level", "sharing_level_backward"}),
            (transition_step, {"transition_step_all"}), (transition_step_all, {"transition_step_all"}),
            (layer_methods, {"sharing_level", "transition_step_all"})]


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_forcing_a_backend_reaches_its_op_from_every_public_function(target, monkeypatch):
    module = _backends._load(target.backend)
    for call, reached in _public_calls(target.device):
        spies = {op: Spy(getattr(module, op)) for op in OPS}
        for op, spy in spies.items():
            monkeypatch.setattr(module, op, spy)
        call()
        ran = {op for op, spy in spies.items() if spy.calls}
        # (The reference's grouped construction calls its own per-layer one: at least these.)
        assert reached <= ran, f"{call.__name__} on {target.backend}: ran {sorted(ran)}, expected {sorted(reached)}"
        for op in OPS:
            monkeypatch.setattr(module, op, spies[op].fn)


# --- who imports whom ---------------------------------------------------------------------------

def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


BACKENDS = ("apsfast._backends.cpu", "apsfast._backends.cuda", "apsfast._backends.triton")


@pytest.mark.parametrize("path", ["apsfast/_backends/cpu.py", "apsfast/_backends/cuda.py",
                                  "apsfast/_backends/triton.py", "apsfast/_backends/sharing_torch.py",
                                  "kernels/construct.py", "kernels/transition.py", "kernels/common.py",
                                  "apsfast/_order.py"])
def test_backends_import_no_reference_and_no_other_backend(path):
    imported = imported_modules(ROOT / path)
    assert not any(name.startswith("apsfast.reference") for name in imported), imported
    own = path.replace("/", ".").removesuffix(".py")
    assert not [name for name in imported if name.startswith(BACKENDS) and name != own], imported


def test_reference_and_sharing_import_no_backend():
    for path in ("apsfast/reference.py", "apsfast/sharing.py"):
        imported = imported_modules(ROOT / path)
        assert not any(name.startswith(BACKENDS + ("apsfast.kernels",)) for name in imported), (path, imported)
    # The public sharing functions reach the reference only through the ops.
    assert "apsfast.reference" not in imported_modules(ROOT / "apsfast/sharing.py")


def test_order_rule_is_one_function():
    # The cheaper of the two mode-product orders (P first: c_o·C_out·C_in + c_o·C_in·c_i, Q first:
    # C_out·C_in·c_i + c_o·C_out·c_i per kernel element); on a tie P first where c_o ≤ C_out
    # (a forward from a square meta-weight), else Q first (its backward).
    orders = set()
    for C_out, c_o, C_in, c_i in [(8, 5, 6, 4), (16, 3, 4, 4), (72, 65, 130, 17), (16, 16, 16, 16), (1, 1, 1, 1),
                                  (208, 16, 208, 16), (16, 208, 16, 208)]:
        p_cost = c_o * C_out * C_in + c_o * C_in * c_i
        q_cost = C_out * C_in * c_i + c_o * C_out * c_i
        assert _order.p_first(C_out, c_o, C_in, c_i) == (p_cost < q_cost or (p_cost == q_cost and c_o <= C_out))
        assert _order.construct_macs(C_out, c_o, C_in, c_i) == min(p_cost, q_cost)
        orders.add(_order.p_first(C_out, c_o, C_in, c_i))
    assert orders == {True, False}
    assert _order.p_first(208, 16, 208, 16) and not _order.p_first(16, 208, 16, 208)
    # Every Python user imports it rather than keeping a copy.
    for path in ("apsfast/reference.py", "kernels/construct.py", "apsfast/benchmarks/kernels.py"):
        source = (ROOT / path).read_text()
        assert "apsfast._order import" in source and "c_o * C_in * c_i" not in source, path


@pytest.mark.parametrize("target", [TRITON_INTERPRETED, TRITON], indirect=True)
def test_triton_supports(target):
    tb = importlib.import_module("apsfast._backends.triton")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert tb.supports(target.device, dtype)
    for dtype in (torch.int32, torch.complex64):
        assert not tb.supports(target.device, dtype)


# --- whole supernets: every backend against the reference on the same device --------------------

def supernet_grads(name: str, backend: str, dtype, amp: bool, scoped, device: str = "cuda"):
    """Loss and gradients of one forward/backward of a small supernet, transforms dense (a
    transition step off the ordinal start), on ``device`` with ``backend`` forced."""
    from apsfast import models
    from apsfast.nn.network import network_transition_step

    scoped.setenv(_backends.ENV_VAR, "reference")
    torch.manual_seed(0)
    options = {"resnet20_cifar": dict(widths=[5, 8, 12], input_size=16),
               "mobilenetv2_imagenet": dict(widths=[4, 6, 8], input_size=32)}[name]
    net = models.build(name, num_classes=7, **options).to(device=device, dtype=dtype)
    network_transition_step(net, 1e-2, relative=True)
    net.set_arch(net.sample_uniform(torch.Generator().manual_seed(3)))
    x = randn(6, 3, options["input_size"], options["input_size"], seed=11, dtype=dtype).to(device)
    y = torch.arange(6, device=device) % 7
    scoped.setenv(_backends.ENV_VAR, backend)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in net.named_parameters() if p.grad is not None}
    return loss.detach().cpu(), grads


def assert_net_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float64 through a whole network: rounding of sums taken in another order, at the
    scale of the tensor (a gradient element can be a near-cancelling sum)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10 * max(scale, 1.0))


@pytest.mark.parametrize("device,backend,name", [
    pytest.param("cpu", "cpu", "resnet20_cifar", id="cpu-cpu-resnet20"),
    pytest.param("cuda", "cuda", "resnet20_cifar", id="cuda-cuda-resnet20", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", "mobilenetv2_imagenet", id="cuda-cuda-mobilenetv2", marks=pytest.mark.gpu),
    pytest.param("cuda", "triton", "resnet20_cifar", id="cuda-triton-resnet20", marks=pytest.mark.gpu),
    pytest.param("cuda", "triton", "mobilenetv2_imagenet", id="cuda-triton-mobilenetv2", marks=pytest.mark.gpu),
])
def test_supernet_matches_reference(device, backend, name, scoped):
    # float64: the backends' kernels against the reference's einsums, through the layers'
    # autograd, on every layer kind of the search spaces; what is compared is non-trivial
    # (every layer's parameters get a gradient).
    if backend not in apsfast.backends():
        pytest.skip(f"the {backend} backend is not built")
    loss, grads = supernet_grads(name, backend, torch.float64, False, scoped, device)
    loss_ref, grads_ref = supernet_grads(name, "reference", torch.float64, False, scoped, device)
    assert_net_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) > 20
    for key in grads:
        assert_net_close(grads[key], grads_ref[key])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_supernet_under_bf16_autocast(backend, scoped):
    # fp32 master weights, bf16 compute: close to the reference under the same autocast.
    loss, grads = supernet_grads("resnet20_cifar", backend, torch.float32, True, scoped)
    loss_ref, grads_ref = supernet_grads("resnet20_cifar", "reference", torch.float32, True, scoped)
    torch.testing.assert_close(loss, loss_ref, rtol=3e-2, atol=3e-2)
    for key in grads:
        assert grads[key].dtype == torch.float32 and grads[key].isfinite().all()
        scale = grads_ref[key].abs().max().clamp_min(1e-3)
        assert (grads[key] - grads_ref[key]).abs().max() <= 0.1 * scale, key
