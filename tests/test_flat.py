"""Parameters and gradients are views into flat buffers, repaired when a caller replaces them."""
import pytest
import torch

from labpal_fast import LABPAL

from helpers import batches, small_net, closure_for

pytestmark = pytest.mark.usefixtures("backend")


def train(net, opt, data, before_each=None):
    for x, y in data:
        if before_each:
            before_each()
        opt.step(closure_for(net, x, y))


def test_params_and_grads_are_views_into_one_buffer():
    net = small_net(0)
    opt = LABPAL(net.parameters())
    (flat,) = opt.flats
    for p in net.parameters():
        assert p.untyped_storage().data_ptr() == flat.param.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()


@pytest.mark.parametrize("habit", ["model.zero_grad", "optimizer.zero_grad", "zero_grad inside closure"])
def test_zero_grad_habits_do_not_change_training(habit):
    data = batches(12, 8, 6, seed=0)
    hyper = dict(approximation_batches=2, momentum=0.5, batch_size_schedule=((0, 2),),
                 noise_factor=1.0, direction_norm_range=(0.0, 1e9))
    ref = small_net(0)
    ref_opt = LABPAL(ref.parameters(), **hyper)
    train(ref, ref_opt, data)
    net = small_net(0)
    opt = LABPAL(net.parameters(), **hyper)
    if habit == "zero_grad inside closure":
        for x, y in data:
            def closure(x=x, y=y):
                net.zero_grad(set_to_none=True)
                return torch.nn.functional.cross_entropy(net(x), y)
            opt.step(closure)
    else:
        hook = net.zero_grad if habit == "model.zero_grad" else opt.zero_grad
        train(net, opt, data, before_each=hook)
    for p, q in zip(ref.parameters(), net.parameters()):
        assert torch.equal(p, q)
    (flat,) = opt.flats
    for p in net.parameters():  # re-attached
        assert p.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()


def test_replaced_parameter_data_is_taken_over():
    net = small_net(0)
    opt = LABPAL(net.parameters(), approximation_batches=1)
    data = batches(3, 8, 6, seed=1)
    train(net, opt, data[:1])
    new = torch.randn_like(net[0].weight)
    net[0].weight.data = new.clone()
    (flat,) = opt.flats
    train(net, opt, data[1:2])  # the step sees the new values
    assert net[0].weight.untyped_storage().data_ptr() == flat.param.untyped_storage().data_ptr()
    assert not torch.equal(net[0].weight, new)  # one update from the new values ...
    assert (net[0].weight - new).abs().max() < 1.0  # ... not from the old ones


def test_parameter_moved_to_another_device_is_an_error():
    net = small_net(0)
    opt = LABPAL(net.parameters())
    net[0].weight.data = net[0].weight.data.to(torch.float64)
    with pytest.raises(RuntimeError, match="create the optimizer after moving the model"):
        train(net, opt, batches(1, 8, 6, seed=2))


def test_mixed_dtypes_get_one_flat_each_and_low_precision_accumulates_in_fp32():
    net = small_net(0)
    net[2].to(torch.bfloat16)
    opt = LABPAL(net.parameters(), master_weights=False)
    dtypes = sorted(str(f.dtype) for f in opt.flats)
    assert dtypes == ["torch.bfloat16", "torch.float32"]
    assert all(f.direction.dtype == torch.float32 for f in opt.flats)
    # with master weights (the default) the bf16 flat works in fp32 beside the model's bf16
    net = small_net(0)
    net[2].to(torch.bfloat16)
    opt = LABPAL(net.parameters())
    assert sorted(str(f.model_dtype) for f in opt.flats) == ["torch.bfloat16", "torch.float32"]
    assert all(f.dtype == torch.float32 for f in opt.flats)
    assert net[2].weight.dtype == torch.bfloat16
