"""What an optimized model guarantees around the call: threads, copies, pickling, weight
reloading, empty batches, and no change to the process's compiler settings."""

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

import mpm_fx
from mpm_fx.bench.models import segmenter

from fixtures import photos

SCHEDULE = (1, 2)


def tiny(seed=0):
    torch.manual_seed(seed)
    return segmenter.segmenter("tiny", decoder="linear", n_cls=3, image_size=64,
                               n_layers=4).eval()


def images(batch=2, size=64):
    return photos(("astronaut", "coffee", "chelsea", "rocket")[:batch], size)


def fresh(model, x):
    """What a newly built optimized model gives: the reference for every cached path."""
    with torch.no_grad():
        return mpm_fx.optimize(model, SCHEDULE)(x)


@pytest.mark.parametrize("copier", [
    copy.deepcopy,
    lambda m: pickle.loads(pickle.dumps(m)),
    lambda m: torch.load(_saved(m), weights_only=False),
], ids=["deepcopy", "pickle", "torch.save"])
def test_copies_and_pickles_after_the_first_call(copier):
    model, x = tiny(), images()
    optimized = mpm_fx.optimize(model, SCHEDULE)
    with torch.no_grad():
        before = optimized(x)
    twin = copier(optimized)
    assert twin.original is not model and not twin._programs  # captures are not copied
    with torch.no_grad():
        assert torch.equal(twin(x), before)
        assert torch.equal(optimized(x), before)  # the original still runs its own capture


def _saved(module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("change", ["load_state_dict_assign", "new_parameter", "new_submodule"])
def test_replaced_weights_and_modules_are_seen(change):
    """After the first call the model's tensors are replaced, not changed in place: the
    optimized model must run the new ones (it kept the captured old ones, relative error ~1)."""
    model, x = tiny(), images()
    optimized = mpm_fx.optimize(model, SCHEDULE)
    with torch.no_grad():
        before = optimized(x)
        if change == "load_state_dict_assign":
            state = {k: v * 1.5 if v.is_floating_point() else v
                     for k, v in tiny(seed=1).state_dict().items()}
            model.load_state_dict(state, assign=True)
        elif change == "new_parameter":
            model.encoder.blocks[3].mlp.fc2.weight = nn.Parameter(
                torch.randn_like(model.encoder.blocks[3].mlp.fc2.weight))
        else:
            model.encoder.blocks[3] = copy.deepcopy(tiny(seed=2).encoder.blocks[0])
        after = optimized(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh(model, x))


def test_reset_drops_captures():
    model, x = tiny(), images()
    optimized = mpm_fx.optimize(model, SCHEDULE, example_inputs=x)
    assert optimized._programs
    optimized.reset()
    assert not optimized._programs
    with torch.no_grad():
        assert torch.equal(optimized(x), fresh(model, x))


def test_batch_of_no_images_returns_the_models_output():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64).eval()
    empty = torch.zeros(0, 3, 64, 64)
    with torch.no_grad():
        out = mpm_fx.optimize(model, SCHEDULE)(empty)
        assert out.shape == model(empty).shape == (0, 1000)


def test_first_calls_from_threads_and_a_failing_one():
    """Three threads make the first calls of one fresh optimized model with different shapes,
    while a fourth makes one that cannot be captured. Capture is serialised: the three get
    their programs, the fourth a CaptureError, and the process is not left half-exporting."""
    model = tiny()
    optimized = mpm_fx.optimize(model, SCHEDULE)
    xs = [images(batch) for batch in (1, 2, 3)]
    bad = torch.randn(1, 4, 64, 64)  # 4 channels: export fails inside the patch embedding
    results, errors = {}, {}

    def call(key, x):
        try:
            with torch.no_grad():
                results[key] = optimized(x)
        except Exception as e:  # noqa: BLE001 (collected and checked below)
            errors[key] = e

    for _ in range(2):  # twice: the second round reuses the captures, in threads
        threads = [threading.Thread(target=call, args=(k, x)) for k, x in enumerate(xs)]
        threads.append(threading.Thread(target=call, args=("bad", bad)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(errors) == {"bad"} and isinstance(errors["bad"], mpm_fx.MPMError), errors
        for k, x in enumerate(xs):  # other threads' kernels may round in another order
            torch.testing.assert_close(results[k], fresh(model, x), rtol=1e-5, atol=1e-5)
        errors.clear()
    assert not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
    assert len(optimized._programs) == 3
    other = tiny(seed=3)
    with torch.no_grad():  # later captures in this process still work
        assert mpm_fx.optimize(other, SCHEDULE)(xs[0]).shape == (1, 3, 64, 64)


def test_optimize_leaves_the_compiler_settings_alone():
    """A library must not change how torch.compile treats other models: after optimize (and a
    call), dynamo's flags are as before and a data-dependent .item() still breaks the graph."""
    from torch._dynamo.testing import CompileCounter

    config = torch._dynamo.config

    def other_model(t):
        n = int((t > 0).sum().item())
        return t[:n] * 2

    def frames():
        torch._dynamo.reset()
        counter = CompileCounter()
        torch.compile(other_model, backend=counter)(torch.randn(10))
        return counter.frame_count

    with config.patch(capture_dynamic_output_shape_ops=False, capture_scalar_outputs=False):
        before = frames()
        optimized = mpm_fx.optimize(tiny(), SCHEDULE, example_inputs=images(1))
        with torch.no_grad():
            optimized(images(1))
        assert not config.capture_dynamic_output_shape_ops and not config.capture_scalar_outputs
        assert frames() == before


def test_compiled_inside_a_bigger_model_with_fullgraph():
    """An optimized model as a submodule of a model that is compiled: dynamo traces it inline
    (capture done before), one graph with fullgraph=True, outputs as eager."""
    from torch._dynamo.testing import CompileCounter

    class Outer(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x * 2).sigmoid()

    x = images(1)
    outer = Outer(mpm_fx.optimize(tiny(), SCHEDULE, example_inputs=x * 2)).eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    with torch.no_grad():
        out = torch.compile(outer, backend=counter, fullgraph=True)(x)
        assert torch.equal(out, outer(x))
    assert counter.frame_count == 1
