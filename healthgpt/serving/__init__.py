"""Serving: load a trained model and answer with it, one request or many.

Modules: ``infer`` (``healthgpt infer`` and the loaders every consumer uses: ``load_model``,
``answer``, ``generate_image(s)``, ``load_vq_decoder``), ``cli`` (``healthgpt serve``), ``api``
(the OpenAI-compatible FastAPI app), ``service`` (requests -> prompts), ``worker`` (the model on
one thread, batching), ``images`` (image inputs and outputs), ``ui`` (the Gradio UI), ``errors``.
"""
