"""The channels-last path: NHWC activations end to end, attention tokens read without a copy, and
the same results as the default (NCHW) layout, for the U-Net, the VAE, a training step and a
translation (tiny presets, fp32, CPU)."""

import pytest
import torch

from cdiff.attention import use_attention_backend
from cdiff.config import UNetConfig, VAEConfig
from cdiff.layers import from_tokens, to_tokens
from cdiff.testing import assert_parity, one_thread, randomize_, tiny_pipeline
from cdiff.unet import UNet
from cdiff.vae import VAE

CL = torch.channels_last
CUDA = torch.cuda.is_available()
# fp32 parity of the two layouts: the same arithmetic, except that the convolutions' inner
# products are summed in another order (oneDNN's NHWC and NCHW kernels), so the outputs differ by
# rounding: measured below 2e-6 of the output's scale; tolerance 1e-5 (the stack's parity
# tolerance with diffusers is 1e-4).
REL_TOL = 1e-5


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_tokens_are_a_view_of_channels_last_memory():
    x = torch.randn(2, 6, 3, 5).to(memory_format=CL)
    tokens = to_tokens(x)  # (B, HW, C)
    assert tokens.shape == (2, 15, 6) and tokens.is_contiguous() and shares_storage(tokens, x)
    assert torch.equal(tokens, x.permute(0, 2, 3, 1).reshape(2, 15, 6))
    tokens[1, 7, 4] = 42.0  # writes through: the same memory
    assert x[1, 4, 1, 2] == 42.0  # token 7 = row 1, column 2
    back = from_tokens(tokens, 3, 5)
    assert back.is_contiguous(memory_format=CL) and shares_storage(back, tokens) and torch.equal(back, x)
    strided = to_tokens(x.contiguous())  # of NCHW memory: a view too, but not a contiguous one
    assert not strided.is_contiguous() and torch.equal(strided, tokens)


def tiny_unet():
    return randomize_(UNet(UNetConfig.tiny(in_channels=8, out_channels=5)), 0).eval()


def unet_inputs(batch=2, side=16):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 8, side, side, generator=gen), torch.tensor([3, 600])[:batch],
            torch.randn(batch, 6, 1024, generator=gen))


def run_recording_layouts(model, *inputs):
    """(output, names of modules whose 4-D output is not channels-last)."""
    names = {module: name for name, module in model.named_modules()}
    not_nhwc = []

    def hook(module, args, out):
        for tensor in out if isinstance(out, tuple) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.ndim == 4 and not tensor.is_contiguous(memory_format=CL):
                not_nhwc.append(names[module])

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        out = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return out, not_nhwc


def test_unet_activations_stay_nhwc_and_match_the_reference():
    unet = tiny_unet()
    sample, t, context = unet_inputs()
    with one_thread(), torch.no_grad():
        reference = unet(sample, t, context)
        unet.to(memory_format=CL)
        out, not_nhwc = run_recording_layouts(unet, sample.to(memory_format=CL), t, context)
    assert not not_nhwc, f"modules whose output left channels-last: {not_nhwc[:5]}"
    assert out.is_contiguous(memory_format=CL)
    assert_parity(out, reference, "U-Net channels-last vs NCHW", REL_TOL)


def test_vae_activations_stay_nhwc_and_match_the_reference():
    vae = randomize_(VAE(VAEConfig.tiny()), 1).eval()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with one_thread(), torch.no_grad():
        latent, reconstruction = vae.encode(images).mean, vae(images)
        vae.to(memory_format=CL)
        images = images.to(memory_format=CL)
        reconstruction_cl, not_nhwc = run_recording_layouts(vae, images)  # encoder, then decoder
        latent_cl = vae.encode(images).mean
    assert not not_nhwc, f"modules whose output left channels-last: {not_nhwc[:5]}"
    assert_parity(latent_cl, latent, "VAE latent channels-last vs NCHW", REL_TOL)
    assert_parity(reconstruction_cl, reconstruction, "VAE reconstruction channels-last vs NCHW", REL_TOL)


def test_attention_reads_its_tokens_without_a_copy():
    # The spatial transformer's proj_in and the VAE mid-attention's projections read the very
    # memory the GroupNorm wrote: a (B, HW, C) view of the NHWC activation.
    unet = tiny_unet().to(memory_format=CL)
    vae = randomize_(VAE(VAEConfig.tiny()), 1).eval().to(memory_format=CL)
    normed, read = [], []
    pairs = [(m.norm, m.proj_in) for m in unet.modules() if type(m).__name__ == "SpatialTransformer"]
    pairs += [(vae.encoder.mid.attn.norm, vae.encoder.mid.attn.to_q)]
    for norm, projection in pairs:
        norm.register_forward_hook(lambda module, args, out: normed.append(out))
        projection.register_forward_pre_hook(lambda module, args: read.append(args[0]))
    with one_thread(), torch.no_grad():
        unet(*unet_inputs(batch=1))
        vae.encode(torch.zeros(1, 3, 64, 64).to(memory_format=CL))
    assert len(read) == len(normed) == len(pairs)
    for activation, tokens in zip(normed, read):
        assert activation.is_contiguous(memory_format=CL) and tokens.ndim == 3 and tokens.is_contiguous()
        assert shares_storage(tokens, activation) and tokens.data_ptr() == activation.data_ptr()


def test_training_gradients_match_the_reference():
    unet = tiny_unet().train()
    sample, t, context = unet_inputs()

    def gradients():
        unet.zero_grad()
        unet(sample, t, context).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in unet.parameters()])

    with one_thread():
        reference = gradients()
        unet.to(memory_format=CL)
        grads = gradients()
    assert all(p.grad.is_contiguous(memory_format=CL) for p in unet.parameters() if p.ndim == 4)
    assert_parity(grads, reference, "U-Net gradients channels-last vs NCHW", REL_TOL)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_pipeline_in_channels_last_translates_the_same(sampler):
    pipe = tiny_pipeline(0)
    sar = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with one_thread():
        reference = pipe.translate(sar, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(4))
        pipe.to(memory_format=CL)
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=CL)
        result = pipe.translate(sar, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(4))
    assert_parity(result.eo, reference.eo, f"translate ({sampler}) channels-last vs NCHW", REL_TOL)
    assert_parity(result.confidence, reference.confidence, "confidence channels-last vs NCHW", REL_TOL)


def test_fused_attention_backend_matches_sdpa():
    # "fused" is SDPA restricted to its fused kernels (on the CPU: its flash kernel), here on the
    # U-Net with a padding mask and on the VAE's single head as wide as its block.
    unet = tiny_unet().to(memory_format=CL)
    vae = randomize_(VAE(VAEConfig.tiny()), 1).eval().to(memory_format=CL)
    sample, t, context = unet_inputs()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)).to(memory_format=CL)
    outputs = {}
    with one_thread(), torch.no_grad():
        for backend in ("sdpa", "fused"):
            with use_attention_backend(backend):
                outputs[backend] = (unet(sample, t, context, mask), vae(images))
    assert_parity(outputs["fused"][0], outputs["sdpa"][0], "U-Net fused vs sdpa attention", REL_TOL)
    assert_parity(outputs["fused"][1], outputs["sdpa"][1], "VAE fused vs sdpa attention", REL_TOL)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the CPU tests above check the same path in fp32)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_channels_last_path_on_cuda(dtype, monkeypatch):
    # The fast path end to end: channels-last weights and activations in fp16/bf16, attention on
    # SDPA's fused kernels only (the VAE's 512-wide head on the memory-efficient kernel), GroupNorm
    # on the Triton kernel; against the fp32 NCHW reference.
    with torch.device("meta"):  # no CPU init of 865M parameters: the values are drawn on the GPU
        unet, vae = UNet(UNetConfig.cdiffset()), VAE(VAEConfig.sd21())
    unet = randomize_(unet.to_empty(device="cuda"), 0).eval()
    vae = randomize_(vae.to_empty(device="cuda"), 1).eval()
    sample, t, context = (x.cuda() for x in unet_inputs(side=32))
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(5)).cuda() * 2 - 1
    with torch.no_grad():
        reference = unet(sample, t, context), vae(images)
        unet.to(dtype=dtype, memory_format=CL)
        vae.to(dtype=dtype, memory_format=CL)
        monkeypatch.setenv("CDIFF_GROUP_NORM", "triton")
        with use_attention_backend("fused"):
            out = unet(sample.to(dtype), t, context.to(dtype)), vae(images.to(dtype))
    assert out[0].is_contiguous(memory_format=CL) and out[1].is_contiguous(memory_format=CL)
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    assert_parity(out[0].float(), reference[0], f"U-Net {dtype} channels-last fused", tol)
    assert_parity(out[1].float(), reference[1], f"VAE {dtype} channels-last fused", tol)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the CPU tests above check the same in fp32)")
@pytest.mark.parametrize("group_norm", ["torch", "triton"])
def test_channels_last_equals_nchw_on_cuda(group_norm, monkeypatch):
    # On the GPU in fp32 with TF32 off, channels-last (GroupNorm by PyTorch or by the Triton
    # kernel) against NCHW: the U-Net's output and gradients, the VAE's reconstruction. cuDNN picks
    # its algorithms per layout (Winograd or implicit GEMM...), which sum in other orders than
    # oneDNN's: tolerance 1e-4, the stack's parity tolerance with diffusers.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    unet = tiny_unet().cuda().train()
    vae = randomize_(VAE(VAEConfig.tiny()), 1).eval().cuda()
    sample, t, context = (x.cuda() for x in unet_inputs())
    images = (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1).cuda()

    def run(fmt):
        unet.zero_grad()
        out, not_nhwc = run_recording_layouts(unet, sample.contiguous(memory_format=fmt), t, context)
        out.square().mean().backward()
        with torch.no_grad():
            reconstruction = vae(images.contiguous(memory_format=fmt))
        return out.detach(), reconstruction, torch.cat([p.grad.flatten() for p in unet.parameters()]), not_nhwc

    reference = run(torch.contiguous_format)
    unet.to(memory_format=CL)
    vae.to(memory_format=CL)
    monkeypatch.setenv("CDIFF_GROUP_NORM", group_norm)
    out, reconstruction, grads, not_nhwc = run(CL)
    print(f"GroupNorm {group_norm}: {len(not_nhwc)} module outputs left channels-last (first: {not_nhwc[:3]})")
    if group_norm == "triton":  # PyTorch's CUDA GroupNorm returns NCHW (benchmarks/README.md); the kernel keeps the layout
        assert not not_nhwc, f"modules whose output left channels-last: {not_nhwc[:5]}"
    assert_parity(out, reference[0], f"U-Net channels-last ({group_norm} GroupNorm) vs NCHW, CUDA fp32", 1e-4)
    assert_parity(grads, reference[2], f"U-Net gradients channels-last ({group_norm}) vs NCHW, CUDA fp32", 1e-4)
    assert_parity(reconstruction, reference[1], f"VAE channels-last ({group_norm}) vs NCHW, CUDA fp32", 1e-4)


# --- training: the trainer's switch, and a resume that keeps the moments' layout -----------------


def test_trainer_switch_gives_the_same_loss_and_gradients(tmp_path, small_config):
    from cdiff.testing import micro_model
    from cdiff.train.cdiffset import CDiffSETTask

    model = micro_model(tmp_path / "micro.safetensors")
    batch = {"sar": torch.rand(2, 3, 64, 64) * 2 - 1, "eo": torch.rand(2, 3, 64, 64) * 2 - 1, "position": torch.tensor([0, 1])}
    results = []
    with one_thread():
        for switch in ("false", "true"):
            task = CDiffSETTask(small_config(model, f"model.channels_last={switch}"), torch.device("cpu"))
            loss = task.loss(batch)[0]
            loss.backward()
            results.append((loss.detach(), torch.cat([p.grad.flatten() for p in task.unet.parameters()])))
    assert task.unet.conv_in.weight.is_contiguous(memory_format=CL)
    assert_parity(results[1][0], results[0][0], "training loss channels-last vs NCHW", REL_TOL)
    assert_parity(results[1][1], results[0][1], "training gradients channels-last vs NCHW", REL_TOL)


def test_resumed_optimizer_state_takes_the_parameters_layout(tmp_path):
    # Checkpoints store the moments contiguous. Fused AdamW walks parameter, gradient and moments as
    # flat memory: a channels-last parameter beside contiguous moments would mix up elements (on
    # the CPU silently: this test fails without rundir._match_layouts).
    from cdiff.train import rundir

    gen = torch.Generator().manual_seed(0)
    weight, grads = torch.randn(4, 3, 3, 3, generator=gen), [torch.randn(4, 3, 3, 3, generator=gen) for _ in range(3)]

    def optimizer_on(param):
        return torch.optim.AdamW([param], lr=0.1, fused=True)

    def step(param, optimizer, grad):
        param.grad = grad.to(memory_format=CL)
        optimizer.step()

    uninterrupted = torch.nn.Parameter(weight.to(memory_format=CL))
    optimizer = optimizer_on(uninterrupted)
    for grad in grads:
        step(uninterrupted, optimizer, grad)

    first = torch.nn.Parameter(weight.to(memory_format=CL))
    optimizer = optimizer_on(first)
    step(first, optimizer, grads[0])
    rundir.write_state(tmp_path, {}, {"unet": optimizer}, {}, torch.amp.GradScaler("cpu", enabled=False), ({}, {}))
    resumed = torch.nn.Parameter(first.detach().clone())
    optimizer = optimizer_on(resumed)
    rundir.restore_state(*rundir.read_state(tmp_path), {"unet": optimizer}, {}, torch.amp.GradScaler("cpu", enabled=False))
    assert all(v.stride() == resumed.stride() for v in optimizer.state[resumed].values() if v.ndim == 4)
    for grad in grads[1:]:
        step(resumed, optimizer, grad)
    torch.testing.assert_close(resumed.detach(), uninterrupted.detach(), rtol=0, atol=0)
