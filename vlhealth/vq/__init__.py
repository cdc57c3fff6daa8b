"""VQGAN image tokenizer: 256x256 images <-> 32x32 = 1024 codes from an 8192-entry codebook.

This is the first-stage model HealthGPT decodes its generated image tokens with: the
taming-transformers ``GumbelVQ`` "OpenImages f8, 8192 codes". Modules: ``network`` (the
configuration and the modules, parameter names in the taming checkpoint layout), ``tokenizer``
(``VQTokenizer`` and ``load_vq``: encode/decode batches, the seeded ``tiny`` model), ``convert``
(weights files: taming ``.ckpt`` / ``.pt`` / ``.safetensors`` read, fitted with named errors,
converted and saved), ``train`` (``vlhealth vq train``: training or fine-tuning a VQGAN on shards;
not imported here). The public names are re-exported here: ``from vlhealth.vq import load_vq, ...``.
"""

from vlhealth.vq.convert import VQCheckpointError, convert_checkpoint, load_state_dict_file, save_vq
from vlhealth.vq.network import (
    CODEBOOK_SIZE,
    GRID,
    GUMBEL_F8_CONFIG,
    IMAGE_SIZE,
    TINY_CONFIG,
    TINY_PRODUCT,
    TOKENS_PER_IMAGE,
    VQGAN,
    VQConfig,
)
from vlhealth.vq.tokenizer import TINY_NOTE, TINY_SEED, VQTokenizer, load_vq

__all__ = [
    "CODEBOOK_SIZE",
    "GRID",
    "GUMBEL_F8_CONFIG",
    "IMAGE_SIZE",
    "TINY_CONFIG",
    "TINY_NOTE",
    "TINY_PRODUCT",
    "TINY_SEED",
    "TOKENS_PER_IMAGE",
    "VQCheckpointError",
    "VQConfig",
    "VQGAN",
    "VQTokenizer",
    "convert_checkpoint",
    "load_state_dict_file",
    "load_vq",
    "save_vq",
]
