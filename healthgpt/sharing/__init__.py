"""Sharing: a trained run as a self-describing folder others can load, and its upload.

Modules: ``export`` (``healthgpt export``: the export folder, its model card, loading it back),
``peft`` (one task plugin in the PEFT adapter layout, both ways), ``publish`` (``healthgpt
publish`` to a Hugging Face model repository).
"""
