"""Reproduce the paper's ablations: experiment YAMLs -> grids of train + eval runs -> tables, verdicts, plots.

Modules: ``spec`` (YAML, grid expansion, ``--run i/n`` shares), ``runner`` (one process per train step
and eval, resumable), ``stats`` (mean ± std, the within-noise rule, claim verdicts), ``results``
(metrics per run, aggregation over seeds, time ratios), ``collect`` (writes results.json, and
results.md through ``tables``, loss curves through ``plots``), ``cli`` (``healthgpt experiment run|collect|list``). The experiments shipped with the
package are ``healthgpt/experiment/experiments/*.yaml``.
"""
