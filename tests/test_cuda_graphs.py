"""CUDA-graph replay of an optimized model (dhp_fx.cuda_graphs). Capture needs a GPU: those tests
skip here and run on the lent device (benchmarks/device_run.sh); the fallbacks and bookkeeping
run everywhere."""
import pytest
import torch

import dhp_fx
from dhp_fx.cuda_graphs import CUDAGraphRunner, _signature

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_bert(device="cpu"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                vocab_size=128)).to(device).eval()


def test_cpu_calls_and_autograd_run_uncaptured():
    calls = []

    def fn(x, scale=2.0):
        calls.append(x)
        return x * scale

    runner = CUDAGraphRunner(fn)
    x = torch.randn(3, requires_grad=True)
    y = runner(x, scale=3.0)  # CPU tensor, grad mode on: a plain call
    assert torch.equal(y, x * 3.0) and y.requires_grad and runner.num_graphs == 0 and len(calls) == 1
    with torch.no_grad():
        assert torch.equal(runner(x.detach()), x.detach() * 2.0)
    assert runner.num_graphs == 0 and len(calls) == 2


def test_warmup_must_leave_autotuning_outside_the_capture():
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphRunner(lambda x: x, warmup=0)


def test_signature_tells_apart_what_may_change_the_path():
    a = torch.zeros(2, 3)
    assert _signature([a, 1]) == _signature([torch.ones(2, 3), 1])
    assert _signature([a, 1]) != _signature([a, 2])
    assert _signature([a]) != _signature([torch.zeros(3, 2)])
    assert _signature([a]) != _signature([torch.zeros(3, 2).t()])  # same shape, other strides
    assert _signature([a]) != _signature([a.double()])
    with torch.inference_mode():
        inside = _signature([a])
    assert inside != _signature([a])
    # a leaf with no value to compare (a cache object, here a bytearray): not replayable at all
    assert _signature([a, bytearray(b"kv")]) is None


def test_bad_limits_are_named():
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphRunner(lambda x: x, max_graphs=0)


def test_lagged_gates_refuse_replay():
    model = tiny_bert()
    ids = torch.randint(3, 128, (2, 8))
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="lagged"), example_inputs=(ids,))
    with pytest.raises(ValueError, match="lagged"):
        opt.cuda_graphed()


def test_gate_changes_drop_the_captures():
    model = tiny_bert()
    ids = torch.randint(3, 128, (2, 8))
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5), example_inputs=(ids,))
    runner = opt.cuda_graphed()
    runner._graphs["sentinel"] = object()
    opt.set_keep_ratio(0.75)
    assert runner.num_graphs == 0
    runner._graphs["sentinel"] = object()
    opt.set_keep_mask(None)
    assert runner.num_graphs == 0
    runner._graphs["sentinel"] = object()
    dhp_fx.calibrate(opt, [(ids,)], measure_flops=False)
    assert runner.num_graphs == 0


@cuda
@pytest.mark.parametrize("scoring,granularity", [("static", "batch"), ("router", "sample"), ("probe", "sample")])
def test_replays_equal_eager_calls_on_new_inputs(scoring, granularity):
    model = tiny_bert("cuda")
    ids = torch.randint(3, 128, (2, 16), device="cuda")
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring=scoring, granularity=granularity),
                          example_inputs=(ids,))
    runner = opt.cuda_graphed()
    with torch.no_grad():
        for seed in range(3):
            g = torch.Generator(device="cuda").manual_seed(seed)
            new = torch.randint(3, 128, (2, 16), device="cuda", generator=g)
            got = runner(new).last_hidden_state
            want = opt(new).last_hidden_state
            torch.testing.assert_close(got, want)
        assert runner.num_graphs == 1
        # another budget: the capture is dropped and the next call sees the new gates
        opt.set_keep_ratio(0.25)
        torch.testing.assert_close(runner(ids).last_hidden_state, opt(ids).last_hidden_state)
        assert runner.num_graphs == 1


@cuda
def test_compact_blocks_replay_and_follow_new_decisions():
    """One input through a per-sample router: the blocks run the kept heads alone (the Triton
    gather reads the keep mask on the device), so replays must follow each input's own heads."""
    model = tiny_bert("cuda")
    ids = torch.randint(3, 128, (1, 16), device="cuda")
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="router"), example_inputs=(ids,))
    assert all(s.compact_block for s in opt.sites)
    blocks = [opt.gate(s).block_module for s in opt.sites]
    runner = opt.cuda_graphed()
    with torch.no_grad():
        for seed in range(3):
            g = torch.Generator(device="cuda").manual_seed(seed)
            new = torch.randint(3, 128, (1, 16), device="cuda", generator=g)
            before = sum(b.calls_compact for b in blocks)
            want = opt(new).last_hidden_state
            assert sum(b.calls_compact for b in blocks) - before == len(blocks)
            torch.testing.assert_close(runner(new).last_hidden_state, want)
        assert runner.num_graphs == 1


def test_a_capture_reads_frozen_copies_only_under_a_runner_that_checks_them():
    """freeze_for_capture: refused outside a runner's capture; inside one, noted with the state of
    its source tensors, which an in-place update or a new storage changes."""
    from dhp_fx import cuda_graphs

    w = torch.randn(4, 4)
    assert not cuda_graphs.freeze_for_capture((w,), w.t().contiguous())
    cuda_graphs._capture_notes.items = notes = []
    try:
        assert cuda_graphs.freeze_for_capture((w,), w.t().contiguous())
    finally:
        cuda_graphs._capture_notes.items = None
    assert len(notes) == 1 and cuda_graphs._frozen_unchanged(notes)
    with torch.no_grad():
        w.mul_(2.0)
    assert not cuda_graphs._frozen_unchanged(notes)
    notes[0] = ((w,), cuda_graphs.tensor_state((w,)), None)
    w.data = torch.randn(4, 4)  # a new storage
    assert not cuda_graphs._frozen_unchanged(notes)


def test_static_compact_blocks_freeze_their_gather_only_for_a_checking_capture(monkeypatch):
    """A static decision's block, "capturing" (simulated on CPU): with a runner's notes it hands
    the graph the warm-up's gather and notes the weights; without, it gathers in the graph."""
    from dhp_fx import compact_block, cuda_graphs

    model = tiny_bert()
    ids = torch.randint(3, 128, (2, 16))
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=(ids,))
    blocks = [opt.gate(s).block_module for s in opt.sites]
    with torch.no_grad():
        want = opt(ids).last_hidden_state  # the warm-up: gathers, or reuses optimize()'s gather
        gathers = [b.gathers for b in blocks]
        monkeypatch.setattr(compact_block, "_capturing", lambda keep: True)
        cuda_graphs._capture_notes.items = notes = []
        try:
            got = opt(ids).last_hidden_state
        finally:
            cuda_graphs._capture_notes.items = None
        assert [b.gathers for b in blocks] == gathers and len(notes) == len(blocks)
        torch.testing.assert_close(got, want)
        got = opt(ids).last_hidden_state  # a capture outside a runner: gathers in the graph
        assert [b.gathers for b in blocks] == gathers and all(b._last is None for b in blocks)
        torch.testing.assert_close(got, want)


@cuda
def test_static_compact_replays_follow_in_place_weight_updates():
    """A static decision's graph reads the gathered weights of its warm-up; an in-place update of
    a weight makes the next call capture again, so a replay never computes with old weights."""
    model = tiny_bert("cuda")
    ids = torch.randint(3, 128, (2, 16), device="cuda")
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=(ids,))
    assert all(s.compact_block for s in opt.sites)
    runner = opt.cuda_graphed()
    with torch.no_grad():
        torch.testing.assert_close(runner(ids).last_hidden_state, opt(ids).last_hidden_state)
        assert runner.num_graphs == 1 and all(c.frozen for c in runner._graphs.values())
        model.encoder.layer[0].attention.self.value.weight.mul_(1.5)
        torch.testing.assert_close(runner(ids).last_hidden_state, opt(ids).last_hidden_state)
        assert runner.num_graphs == 1
