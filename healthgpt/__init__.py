"""HealthGPT: the model, its training, evaluation, serving and sharing (see ARCHITECTURE.md)."""

# The notice every output a person reads carries: `healthgpt infer`, the evaluation report, the server.
RESEARCH_USE = "Research use only, not for clinical use."
