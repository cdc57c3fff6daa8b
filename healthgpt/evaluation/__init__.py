"""Evaluation: a trained model on held-out shards -> scores, baselines, reports and the verdict.

Modules: ``evaluate`` (``healthgpt eval``: batched decoding, resumable, sharded over ranks),
``samples`` (what an evaluated sample is: benchmark names, target modality), ``answer_metrics``
(VQA close/open/choice scoring), ``baselines`` (identity, train mean, blank, majority, random
choice), ``reliance`` (image reliance: the seeded derangement of test images behind the rows
``model, shuffled images``, and the true target's teacher-forced loss), ``report`` (report.json /
report.md / grids from the predictions and baselines it is given), ``volume_eval`` with
``volume_metrics`` (``healthgpt eval-volumes``: SynthRAD2023's 3D scoring), ``verdict``
(``healthgpt verdict``: model vs best baseline vs target, image reliance, validation-loss targets).
The 2D image metrics live in :mod:`vlhealth.image_metrics`.
"""
