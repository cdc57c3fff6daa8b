"""Training: shards -> task batches -> optimizer steps -> checkpoints and ``final/trainable.safetensors``.

Modules: ``train`` (``healthgpt train``: set-up, the loop, one optimizer step), ``stages`` (which
parameter groups each stage trains), ``hparams`` (the paper's Table 7 as ``configs/train_<preset>.yaml``,
per stage and task), ``data`` (task batches, packing, exact resume) with ``sources`` (local tars
read by seeking, or streamed URLs), ``dist`` (torch.distributed set-up, shared with the evaluator),
``checkpoints`` (training checkpoints: weights, optimizer, RNG and data position; resume),
``loss_trend`` (start/end loss per task, divergence warnings), ``pretrain_text`` (``healthgpt
pretrain-text``), ``trackers`` (``--report-to``: csv, TensorBoard, W&B, MLflow). ``python -m healthgpt.training``
is ``healthgpt train`` (for torchrun).

Imports only ``healthgpt.model``, ``healthgpt.sharing`` (``--init`` from an export folder or a Hub id) and
``vlhealth``.
"""
