"""``python -m healthgpt.training ...`` (e.g. ``torchrun --nproc-per-node N -m healthgpt.training ...``) is
``healthgpt train ...``."""

from healthgpt.training.train import main

if __name__ == "__main__":  # pragma: no cover
    main()
