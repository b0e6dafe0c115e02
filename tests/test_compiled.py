"""Compiled and graph-captured sampling, each against the eager path.

- ``Pipeline.compile()``: torch.compile (Inductor, whole graph) of the U-Net; one CPU test on a
  micro U-Net, as compiling costs tens of seconds on a CPU.
- ``translate(cuda_graph=True)``: the sampling loop captured once in a CUDA graph and replayed.
  On the CPU, the same code runs with ``graphs.eager_capture``, a stand-in whose "replay" calls
  the function again on the static buffers: this checks that the loop reads only its inputs,
  that new inputs reach the buffers, and when a capture is reused or redone. The CUDA tests
  (skipped without a GPU) run the real capture.
"""

import pytest
import torch

from cdiff import graphs
from cdiff.config import UNetConfig, VAEConfig
from cdiff.pipeline import Pipeline
from cdiff.testing import assert_parity, one_thread, randomize_, tiny_pipeline
from cdiff.unet import UNet
from cdiff.vae import VAE

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (the CPU tests run the same loop through graphs.eager_capture)"


def micro_pipeline() -> Pipeline:
    """One level (no resampling), one res block and transformer: the U-Net's every kind of layer
    at the smallest compile cost."""
    unet = UNet(UNetConfig.tiny(in_channels=8, out_channels=5, model_channels=16, channel_mult=(1,),
                                num_res_blocks=1, attention_levels=(True,), norm_groups=4))
    vae = VAE(VAEConfig.tiny(block_channels=(8, 8), norm_groups=4))
    return Pipeline(randomize_(unet, 0).eval(), randomize_(vae, 1).eval(), torch.randn(6, 1024))


def sar(batch=1, side=16, seed=0):
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_compiled_unet_translates_as_eager(monkeypatch):
    import torch._inductor.config as inductor_config

    # No worker pool on a small, busy machine; scalar C++ (no SIMD intrinsics) compiles about
    # 1.5x faster and keeps what is tested here: Inductor's decompositions, fusions and loops.
    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", False)
    pipe = micro_pipeline()
    images = sar(batch=2)
    with one_thread():
        eager = pipe.translate(images, steps=2, generator=torch.Generator().manual_seed(1))
        try:
            compiled = pipe.compile(fullgraph=True).translate(images, steps=2, generator=torch.Generator().manual_seed(1))
        finally:
            torch._dynamo.reset()
    assert pipe.denoiser is not pipe.unet and pipe.compile(enabled=False).denoiser is pipe.unet
    # Inductor fuses and reorders the fp32 arithmetic: rounding-level differences only.
    assert_parity(compiled.eo, eager.eo, "compiled vs eager EO", 1e-5)
    assert_parity(compiled.confidence, eager.confidence, "compiled vs eager confidence", 1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_graph_loop_uses_its_static_buffers(sampler, monkeypatch):
    monkeypatch.setattr(Pipeline, "_capture", staticmethod(graphs.eager_capture))
    pipe = tiny_pipeline(0)
    first, second = sar(side=64, seed=1), sar(side=64, seed=2)
    run = dict(steps=3, sampler=sampler)
    with one_thread():
        expected = [pipe.translate(x, generator=torch.Generator().manual_seed(i), **run) for i, x in enumerate((first, second))]
        graphed = [pipe.translate(x, generator=torch.Generator().manual_seed(i), cuda_graph=True, **run)
                   for i, x in enumerate((first, second))]
        captured = pipe._graph[1]
        again = pipe.translate(first, generator=torch.Generator().manual_seed(0), cuda_graph=True, **run)
        assert pipe._graph[1] is captured  # same shapes: replayed, not captured again
        bigger = pipe.translate(sar(side=128), cuda_graph=True, **run)
        assert pipe._graph[1] is not captured and bigger.eo.shape == (1, 3, 128, 128)
    for i, (ours, reference) in enumerate(zip(graphed + [again], expected + expected[:1])):
        # The same kernels on the same values: equal to the bit.
        assert torch.equal(ours.eo, reference.eo) and torch.equal(ours.confidence, reference.confidence), i
    assert not torch.equal(graphed[0].eo, graphed[1].eo)  # the second input reached the buffers


def test_captured_function_returns_fresh_outputs_and_checks_inputs():
    captured = graphs.CapturedFunction(lambda a, b: (a * 2 + b, a.sum()), (torch.ones(3), torch.zeros(3)),
                                       capture=graphs.eager_capture)
    out, total = captured(torch.arange(3.0), torch.ones(3))
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0, 5.0]))
    captured(torch.zeros(3), torch.zeros(3))  # the next replay overwrites the static buffers ...
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0, 5.0]))  # ... not what was returned
    assert total.item() == 3.0
    with pytest.raises(ValueError, match="differ from the captured ones"):
        captured(torch.zeros(4), torch.zeros(4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "needs the model on a CUDA device"),
    (dict(eta=0.5), "needs eta=0 and tiling=None"),
])
def test_cuda_graph_refusals(kwargs, message):
    if CUDA and not kwargs:
        pytest.skip("a CUDA device is present: the CPU refusal does not apply")
    with pytest.raises(ValueError, match=message):
        micro_pipeline().translate(sar(), steps=2, cuda_graph=True, **kwargs)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_cuda_graph_translation_equals_eager(sampler):
    pipe = tiny_pipeline(0).to("cuda")
    first, second = sar(side=128, seed=1).cuda(), sar(side=128, seed=2).cuda()
    for images in (first, second):
        noise = torch.randn(1, 4, 16, 16, device="cuda")
        eager = pipe.translate(images, steps=10, sampler=sampler, latents=noise)
        graphed = pipe.translate(images, steps=10, sampler=sampler, latents=noise, cuda_graph=True)
        assert_parity(graphed.eo, eager.eo, f"CUDA graph vs eager ({sampler})", 1e-5)
        assert_parity(graphed.confidence, eager.confidence, "CUDA graph vs eager confidence", 1e-5)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_compiled_unet_on_cuda_in_half_precision():
    pipe = tiny_pipeline(0).to("cuda", torch.float16, memory_format=torch.channels_last)
    images = sar(side=128).cuda()
    noise = torch.randn(1, 4, 16, 16, device="cuda")
    eager = pipe.translate(images, steps=4, latents=noise)
    try:
        compiled = pipe.compile(fullgraph=True).translate(images, steps=4, latents=noise, cuda_graph=True)
    finally:
        torch._dynamo.reset()
    assert_parity(compiled.eo.float(), eager.eo.float(), "compiled + CUDA graph vs eager, fp16", 2e-2)
