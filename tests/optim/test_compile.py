"""WormSGD and WormAdamW under torch.compile (docs/compile.md).

``opt.step`` compiles to one graph (``fullgraph=True``: no graph break) on every
runnable (backend, device), and so does a whole training step (forward, backward and
step); the parameters and states match eager step for step (fp64 within 1e-12, fp32
within 1e-6); and once the step has met its states and masks it is never compiled again
(``error_on_recompile``), while ``set_truncation`` (or an ``EarlyBirdSearch`` check) sets
new masks and a new ``r`` and a tensor lr changes: masks, ``r`` and lr are inputs of the
graph, not constants.

Most tests compile with ``aot_eager`` (Dynamo and AOT functionalization, which is where
an op's fake kernel and declared mutations matter, without Inductor's slow C++ builds);
one compiles with Inductor, whose generated code rounds differently.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from tests.utils import assert_close, fill_grads, make_params, random_bool_masks
from worm_fast import EarlyBirdSearch, WormAdamW, WormSGD

OPTIMIZERS = {
    "sgd": lambda params, **kw: WormSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, **kw),
    "adamw": lambda params, **kw: WormAdamW(params, lr=0.01, **kw),
}
SIZES = (35, 65, 3)  # the last parameter is never masked
TOLERANCE = {torch.float64: dict(rtol=0, atol=1e-12), torch.float32: dict(rtol=0, atol=1e-6)}
# Step -> (mask density, r) set before it: masks of the first two parameters, new each time.
TRUNCATIONS = {2: (0.5, 0.5), 4: (0.3, 3e-3), 6: (0.7, 0.25)}
STEPS = 9  # truncation cleared before the last


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts its own graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same(compiled_opt, compiled, eager_opt, eager, what):
    """Parameters and every state tensor agree within the dtype's tolerance."""
    tol = TOLERANCE[eager[0].dtype]
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert_close(c.detach(), e.detach(), what=f"{what}: param {i}", **tol)
        for key, value in eager_opt.state[e].items():
            other = compiled_opt.state[c][key]
            assert_close(other, value, what=f"{what}: param {i} {key}", **tol)


def truncate(step, pairs, seed):
    """Before ``step``: the same new masks and r (TRUNCATIONS) for every
    (optimizer, params) pair, or none at all before the last step."""
    if step == STEPS - 1:
        for opt, _ in pairs:
            opt.clear_truncation()
    if step not in TRUNCATIONS:
        return
    density, r = TRUNCATIONS[step]
    masks = list(random_bool_masks(pairs[0][1][:2], density, seed=seed + step).values())
    for opt, params in pairs:
        opt.set_truncation(dict(zip(params[:2], masks)), r)


def op_calls(graph_module) -> int:
    return sum(
        node.op == "call_function" and "worm_fast" in str(node.target)
        for node in graph_module.graph.nodes
    )


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_step_is_one_graph_with_masks_and_r_as_inputs(backend_device, optimizer):
    backend, device = backend_device
    eager_params, params = (make_params(SIZES, torch.float64, device=device) for _ in "ab")
    eager_opt = OPTIMIZERS[optimizer](eager_params, backend=backend)
    opt = OPTIMIZERS[optimizer](params, backend=backend)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for i in range(STEPS):
        truncate(i, [(eager_opt, eager_params), (opt, params)], seed=1)
        fill_grads(eager_params, i)
        fill_grads(params, i)
        eager_opt.step()
        # Three graphs: the first step (it creates the states), later steps, and later
        # steps with masks; new masks, a new r and clear_truncation reuse them.
        with torch._dynamo.config.patch(error_on_recompile=i > 2):
            step()
        assert_same(opt, params, eager_opt, eager_params, f"{backend} {optimizer} step {i}")
    assert counter.frame_count == 3
    if backend != "reference":  # an opaque op: one call per graph, never its insides
        assert [op_calls(graph) for graph in counter.graphs] == [1, 1, 1]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_training_step_is_one_graph(optimizer):
    # Forward, backward and step in one graph (trace_autograd_ops lets Dynamo trace
    # backward; without it the graph breaks there, as it does for any optimizer).
    def model():
        torch.manual_seed(0)
        layers = torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
        return torch.nn.Sequential(*layers).double()

    def train(net, opt, x, y):
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    eager_net, net = model(), model()
    eager_opt = OPTIMIZERS[optimizer](list(eager_net.parameters()))
    opt = OPTIMIZERS[optimizer](list(net.parameters()))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(train, backend=counter, fullgraph=True)
    pairs = [(eager_opt, list(eager_net.parameters())), (opt, list(net.parameters()))]
    data = torch.Generator().manual_seed(2)
    for i in range(STEPS):
        truncate(i, pairs, seed=3)
        x = torch.randn(5, 6, dtype=torch.float64, generator=data)
        y = torch.randn(5, 2, dtype=torch.float64, generator=data)
        eager_opt.zero_grad()
        opt.zero_grad()  # outside: torch.optim marks zero_grad as not traceable
        expected = train(eager_net, eager_opt, x, y)
        with torch._dynamo.config.patch(trace_autograd_ops=True, error_on_recompile=i > 2):
            loss = compiled(net, opt, x, y)
        assert_close(loss, expected, what=f"loss {i}", **TOLERANCE[torch.float64])
        assert_same(opt, pairs[1][1], eager_opt, pairs[0][1], f"{optimizer} step {i}")
    assert counter.frame_count == 3


def test_search_checks_between_compiled_steps_compile_nothing():
    # EarlyBirdSearch hands the optimizer new packed masks (views of its window's rows)
    # at every check; mode "truncate" from the first one on.
    torch.manual_seed(0)
    layers = torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten()
    model = torch.nn.Sequential(*layers, torch.nn.Linear(8 * 6 * 6, 2))
    opt = WormSGD(model.parameters(), lr=0.05, momentum=0.9)
    search = EarlyBirdSearch(model, opt, mode="truncate", window=3, stop_distance=1e-9)
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def train(x, y):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    data = torch.Generator().manual_seed(5)
    for epoch in range(5):
        for _ in range(2):
            x, y = torch.randn(4, 1, 8, 8, generator=data), torch.randint(0, 2, (4,))
            opt.zero_grad()
            recompiles_refused = epoch > 1  # the first check set masks: one more graph
            with torch._dynamo.config.patch(
                trace_autograd_ops=True, error_on_recompile=recompiles_refused
            ):
                train(x, y)
        search.check()
    assert opt.truncation == 3e-3 and len(opt.truncation_masks) == 1
    assert counter.frame_count == 3


def test_tensor_lr_changes_without_compiling_again():
    eager_params, params = (make_params(SIZES, torch.float64) for _ in "ab")
    eager_opt = WormSGD(eager_params, lr=torch.tensor(0.1), momentum=0.9)
    opt = WormSGD(params, lr=torch.tensor(0.1), momentum=0.9)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for i, lr in enumerate((0.1, 0.1, 0.05, 0.02, 0.2)):
        for o in (eager_opt, opt):
            o.param_groups[0]["lr"].fill_(lr)  # as an LR scheduler does with a tensor lr
        fill_grads(eager_params, i)
        fill_grads(params, i)
        eager_opt.step()
        with torch._dynamo.config.patch(error_on_recompile=i > 1):
            step()
        assert_same(opt, params, eager_opt, eager_params, f"lr {lr}")
    assert counter.frame_count == 2


@pytest.mark.parametrize(
    "optimizer, backend", [("sgd", None), ("adamw", "reference")], ids=["sgd-auto", "adamw-ref"]
)
def test_inductor_matches_eager_in_fp32(optimizer, backend):
    # Inductor generates the code around the opaque C++ op, and all of the traced
    # reference step, which it fuses and rounds its own way.
    eager_params, params = (make_params(SIZES, torch.float32) for _ in "ab")
    kwargs = {} if backend is None else {"backend": backend}
    eager_opt = OPTIMIZERS[optimizer](eager_params, **kwargs)
    opt = OPTIMIZERS[optimizer](params, **kwargs)
    masks = list(random_bool_masks(params[:2], 0.5, seed=4).values())
    eager_opt.set_truncation(dict(zip(eager_params[:2], masks)), 3e-3)
    opt.set_truncation(dict(zip(params[:2], masks)), 3e-3)
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for i in range(5):
        if i == 3:
            masks = list(random_bool_masks(params[:2], 0.5, seed=5).values())
            eager_opt.set_truncation(dict(zip(eager_params[:2], masks)), 0.5)
            opt.set_truncation(dict(zip(params[:2], masks)), 0.5)
        fill_grads(eager_params, i)
        fill_grads(params, i)
        eager_opt.step()
        with torch._dynamo.config.patch(error_on_recompile=i > 1):
            step()
        assert_same(opt, params, eager_opt, eager_params, f"inductor {optimizer} step {i}")
    assert counter.frame_count == 2


def test_bad_input_is_refused_under_compile_and_changes_nothing():
    params = make_params((10, 3), torch.float32)
    opt = WormSGD(params, lr=0.1, momentum=0.9)
    opt.set_truncation({params[0]: torch.ones(10, dtype=torch.bool)}, 0.1)
    fill_grads(params, 0)
    torch.compile(opt.step, backend="aot_eager", fullgraph=True)()
    with torch.no_grad():
        params[0].data = torch.zeros(12)  # the mask no longer fits its parameter
    fill_grads(params, 1)
    state = [params[0], params[1], opt.state[params[0]]["momentum_buffer"]]
    before = [t.detach().clone() for t in state]
    message = r"parameter 0 has shape \(12,\), but its truncation mask was set for shape \(10,\)"
    # With fullgraph=True Dynamo's error quotes ours; without, Dynamo runs a frame that
    # raises eagerly, so the error is ours.
    with pytest.raises(torch._dynamo.exc.Unsupported, match=message):
        torch.compile(opt.step, backend="aot_eager", fullgraph=True)()
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=message):
        torch.compile(opt.step, backend="aot_eager")()
    for tensor, saved in zip(state, before):
        assert torch.equal(tensor.detach(), saved)
