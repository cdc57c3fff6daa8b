"""The model: what HealthGPT is, independent of how it is trained, scored or served.

Modules: ``core`` (``HealthGPT``: state, task routing and the forward pass), ``embedding`` (the
multimodal input embeddings: text ids plus image features in place of ``<image>``),
``generation`` (greedy/sampled decoding of text and of VQ image tokens), ``hlora`` (H-LoRA, LoRA
and MoELoRA plugins), ``vision`` (hierarchical visual perception: CLIP abstract/concrete features,
adapters, the loader's pre-processing), ``conversation`` (templates, tokenisation, the 8195 new
tokens), ``presets`` (tiny, smollm2-135m, m3, l14, xl32 and ``build_model``), ``weights`` (our
trainable-weights file: ``save_trainable`` / ``load_trainable``), ``released`` (the released
HealthGPT-M3 files mapped onto our parameter names).

Nothing here imports the other ``healthgpt`` subpackages.
"""
