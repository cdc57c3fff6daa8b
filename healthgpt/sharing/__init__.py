"""Sharing: a trained run as a self-describing folder others can load, and its upload.

Modules: ``export`` (``healthgpt export``: the export folder, its model card, loading it back),
``peft`` (one task plugin in the PEFT adapter layout, both ways), ``publish`` (``healthgpt
publish`` to a Hugging Face model repository), ``hub`` (``hf://ORG/NAME[@REVISION]`` ids resolved
through huggingface_hub's cache, for every option that takes a checkpoint or export folder).

Imports only ``healthgpt.model`` and ``vlhealth`` (``training`` builds on it for ``--init``).
"""
