"""S2O-NPDE (Zhang et al., IJCAI 2022): SAR-to-optical translation with neural PDEs, built
from the paper (no code was published). A CycleGAN-style GAN whose generator has TCD
residual blocks (Eq. 4) and a parallel Perona-Malik (PMD) module (Eq. 7), trained with
adversarial, pixel, perceptual, cycle and PDE losses (Eq. 8-9).

    config.py    NPDEConfig: every network and loss number, presets paper(), tiny(), ablation(row)
    pde.py       PMDHead: the fixed finite-difference head phi of Eq. 7
    model.py     NPDEGenerator, PatchDiscriminator, NPDEModel (the four networks), translate
    vgg.py       VGGFeatures, load_vgg: the perceptual loss's VGG from a local file
    losses.py    NPDELoss: Eq. 8-9
    training.py  training_step, make_optimizers, lr_factor, ImagePool / FakePools, the PAPER_* settings
    files.py     save_model, load_model, load_generator: the model file (safetensors + config)
    inference.py translate_image: any size, padded and tiled

``cdiff train`` trains it with ``model.kind = "s2o_npde"`` (cdiff.train.s2o_npde); ``cdiff
translate`` recognises its model files.
"""

from cdiff.npde.config import TABLE2_ROWS, NPDEConfig
from cdiff.npde.files import is_model_file, load_generator, load_model, save_model
from cdiff.npde.inference import translate_image
from cdiff.npde.losses import NPDELoss, lsgan
from cdiff.npde.model import GeneratorOutput, NPDEGenerator, NPDEModel, PatchDiscriminator, translate
from cdiff.npde.pde import PMDHead
from cdiff.npde.training import (
    PAPER_BATCH_SIZE, PAPER_BETAS, PAPER_EPOCHS, PAPER_LR, FakePools, ImagePool, Optimizers, lr_factor, make_optimizers,
    training_step,
)
from cdiff.npde.vgg import VGGFeatures, load_vgg

__all__ = [
    "TABLE2_ROWS", "FakePools", "GeneratorOutput", "ImagePool", "NPDEConfig", "NPDEGenerator", "NPDELoss", "NPDEModel",
    "Optimizers", "PMDHead", "PatchDiscriminator", "VGGFeatures", "load_vgg", "lr_factor", "lsgan",
    "make_optimizers", "training_step", "translate",
    "PAPER_BATCH_SIZE", "PAPER_BETAS", "PAPER_EPOCHS", "PAPER_LR", "is_model_file", "load_generator", "load_model",
    "save_model", "translate_image",
]
