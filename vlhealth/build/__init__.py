"""The build runner shared by every builder: discovery, splits, rejects, VQ encoding, shards.

A builder (``builders/<source>.py``) is a small module satisfying :class:`Builder` (the required
``NAME``, ``MANIFEST``, ``Options``, ``discover``, ``process``), plus any of the optional hooks in
``OPTIONAL_HOOKS`` (``SPLITS``, ``GENERATES``, ``EXAMPLE``, ``split_strata``, ``preset_splits``),
read only through :func:`builder_hook`. ``tests/test_build.py`` checks every registered builder.

Builders never touch tars, the CLI or the VQ model: they yield :class:`~vlhealth.schema.Sample`
objects whose generation targets are 256x256 arrays; the runner fills ``target_vq`` in one batch
per item. Any exception raised while processing an item turns the whole item into a reject
(file + reason) and the build goes on; ``strict`` makes the final exit status non-zero.

Modules: ``contract`` (the builder contract: ``Builder``, ``Item``, ``Reject``, ``ItemReport``,
``Rejected``, ``BuildContext``, the optional hooks), ``plan`` (splits, partitions, the resume
fingerprint and journal, ``build.json``), ``items`` (a builder run on items, in worker processes,
VQ codes of the targets), ``writing`` (items into tars with the resume journal; merging
partitions), ``runner`` (``run_build``). The public names are re-exported here:
``from vlhealth.build import run_build, Item, Reject, ...``.
"""

from vlhealth.build.contract import (
    OPTIONAL_HOOKS,
    BuildContext,
    Builder,
    Item,
    ItemReport,
    Reject,
    Rejected,
    builder_hook,
)
from vlhealth.build.items import encode_targets, process_item
from vlhealth.build.plan import (
    DEFAULT_FRACTIONS,
    SPLITS_NAME,
    ResumeError,
    assign_splits,
    options_to_json,
    parse_partition,
    partition_groups,
    partition_suffix,
    splits_record,
    versions,
)
from vlhealth.build.runner import BuildSummary, run_build
from vlhealth.build.writing import merge_partitions

__all__ = [
    "DEFAULT_FRACTIONS",
    "OPTIONAL_HOOKS",
    "SPLITS_NAME",
    "BuildContext",
    "BuildSummary",
    "Builder",
    "Item",
    "ItemReport",
    "Reject",
    "Rejected",
    "ResumeError",
    "assign_splits",
    "builder_hook",
    "encode_targets",
    "merge_partitions",
    "options_to_json",
    "parse_partition",
    "partition_groups",
    "partition_suffix",
    "process_item",
    "run_build",
    "splits_record",
    "versions",
]
