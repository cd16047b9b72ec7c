"""Loads and validates the topology in `regions/` (one TOML file per region).

The one reader of `regions/`: the app, the local stack and `infra/` all call `load_topology`. Every error
names the file and the field, so a platform engineer can fix a bad edit without reading this code.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

from app.topology.model import SLOT_COUNT, Capacity, Region, Shard, SlotRange, Topology

DEFAULT_REGIONS_DIR = Path(__file__).resolve().parents[2] / "regions"

_REGION_NAME = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
_SHARD_NAME = re.compile(r"^[a-z0-9]+-[a-z0-9]+$")
_RANGE = re.compile(r"^([0-9]{1,4})-([0-9]{1,4})$")
_REGION_KEYS = {"name", "vpc_cidr", "capacity", "shards"}
# The DB instance classes RDS offers for Multi-AZ DB clusters (non-Aurora), the only deployment infra/ makes:
# Amazon RDS User Guide, "Instance class availability for Multi-AZ DB clusters". Not every class exists in
# every region: infra/README.md says how to check one before adding it.
MULTI_AZ_DB_CLUSTER_CLASS_FAMILIES = frozenset(
    {"m5d", "m6gd", "m6id", "m6idn", "r5d", "r6gd", "r6id", "r6idn", "x2iedn", "c6gd"})
_DB_INSTANCE_CLASS = re.compile(r"^db\.([a-z0-9]+)\.(medium|large|[0-9]*xlarge|metal)$")
# infra/ gives every cluster gp3 storage with explicit IOPS (CreateDBCluster requires IOPS for a Multi-AZ DB
# cluster), and RDS for PostgreSQL accepts explicit gp3 IOPS only from 400 GiB (Amazon RDS User Guide,
# "Amazon RDS DB instance storage", gp3 storage performance).
DB_ALLOCATED_STORAGE_GB_MIN = 400
_SHARD_KEYS = {"name", "slots"}


class TopologyError(ValueError):
    """`regions/` is invalid; the message names the file and the field."""


def load_topology(directory: Path | str | None = None) -> Topology:
    folder = Path(directory) if directory is not None else DEFAULT_REGIONS_DIR
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise TopologyError(f"{folder}: no region files (*.toml)")
    regions = tuple(_load_region(path) for path in files)
    _check_unique_names(regions)
    _check_disjoint_cidrs(regions)
    _check_slot_cover(regions)
    return Topology(regions=regions)


def _load_region(path: Path) -> Region:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{path}: not valid TOML: {exc}") from None
    _no_unknown_keys(path, "", data, _REGION_KEYS)
    name = _str(path, "name", data.get("name"))
    if not _REGION_NAME.match(name):
        raise TopologyError(f"{path}: name: {name!r} is not an AWS region name like 'eu-west-1'")
    if path.stem != name:
        raise TopologyError(f"{path}: name: {name!r} must match the file name '{path.stem}.toml'")
    cidr = _str(path, "vpc_cidr", data.get("vpc_cidr"))
    try:
        net = ipaddress.IPv4Network(cidr)
    except ValueError as exc:
        raise TopologyError(f"{path}: vpc_cidr: {exc}") from None
    if not 16 <= net.prefixlen <= 20:
        raise TopologyError(f"{path}: vpc_cidr: {cidr} must be a /16 to /20 to hold three AZs of subnets")
    capacity = _capacity(path, data.get("capacity"))
    raw_shards = data.get("shards")
    if not isinstance(raw_shards, list) or not raw_shards:
        raise TopologyError(f"{path}: shards: at least one [[shards]] table is required")
    shards = tuple(_shard(path, i, name, s) for i, s in enumerate(raw_shards))
    return Region(name=name, vpc_cidr=str(net), capacity=capacity, shards=shards, source=str(path))


def _capacity(path: Path, raw: Any) -> Capacity:
    if not isinstance(raw, dict):
        raise TopologyError(f"{path}: capacity: a [capacity] table is required")
    fields = Capacity.__dataclass_fields__
    _no_unknown_keys(path, "capacity.", raw, set(fields))
    values: dict[str, Any] = {}
    for key in fields:
        value = raw.get(key)
        if key == "db_instance_class":
            values[key] = _db_instance_class(path, _str(path, f"capacity.{key}", value))
        else:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TopologyError(f"{path}: capacity.{key}: must be a positive integer, got {value!r}")
            values[key] = value
    if values["db_allocated_storage_gb"] < DB_ALLOCATED_STORAGE_GB_MIN:
        raise TopologyError(
            f"{path}: capacity.db_allocated_storage_gb: {values['db_allocated_storage_gb']} is below "
            f"{DB_ALLOCATED_STORAGE_GB_MIN}: RDS for PostgreSQL takes explicit gp3 IOPS (required for a Multi-AZ "
            "DB cluster) only from 400 GiB"
        )
    return Capacity(**values)


def _db_instance_class(path: Path, value: str) -> str:
    m = _DB_INSTANCE_CLASS.match(value)
    if m is None or m.group(1) not in MULTI_AZ_DB_CLUSTER_CLASS_FAMILIES:
        raise TopologyError(
            f"{path}: capacity.db_instance_class: {value!r} is not offered for RDS Multi-AZ DB clusters "
            f"(families: {', '.join('db.' + f for f in sorted(MULTI_AZ_DB_CLUSTER_CLASS_FAMILIES))})"
        )
    return value


def _shard(path: Path, index: int, region: str, raw: Any) -> Shard:
    where = f"shards[{index}]"
    if not isinstance(raw, dict):
        raise TopologyError(f"{path}: {where}: must be a table")
    _no_unknown_keys(path, f"{where}.", raw, _SHARD_KEYS)
    name = _str(path, f"{where}.name", raw.get("name"))
    if not _SHARD_NAME.match(name):
        raise TopologyError(f"{path}: {where}.name: {name!r} must look like 'euw1-a' (lowercase, one dash)")
    # A shard may own no slots yet (`slots = []`): a new region's shards exist before slots are moved to
    # them (`txroute slots plan`); such a shard is provisioned and served, and takes no new accounts.
    slots = raw.get("slots")
    if not isinstance(slots, list):
        raise TopologyError(f"{path}: {where}.slots: a list of 'lo-hi' ranges is required ([] for none yet)")
    ranges = []
    for j, text in enumerate(slots):
        m = _RANGE.match(text) if isinstance(text, str) else None
        lo, hi = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
        if not m or not 0 <= lo <= hi < SLOT_COUNT:
            raise TopologyError(
                f"{path}: {where}.slots[{j}]: {text!r} must be 'lo-hi' with 0 <= lo <= hi <= {SLOT_COUNT - 1}"
            )
        ranges.append(SlotRange(lo, hi))
    return Shard(name=name, region=region, slots=tuple(ranges))


def _check_unique_names(regions: tuple[Region, ...]) -> None:
    seen: dict[str, str] = {}
    for region in regions:
        for shard in region.shards:
            if shard.name in seen:
                raise TopologyError(
                    f"{region.source}: shards.name: {shard.name!r} is also defined in {seen[shard.name]}"
                )
            seen[shard.name] = region.source


def _check_disjoint_cidrs(regions: tuple[Region, ...]) -> None:
    for i, a in enumerate(regions):
        for b in regions[i + 1 :]:
            if ipaddress.IPv4Network(a.vpc_cidr).overlaps(ipaddress.IPv4Network(b.vpc_cidr)):
                raise TopologyError(
                    f"{b.source}: vpc_cidr: {b.vpc_cidr} overlaps {a.vpc_cidr} of {a.source}"
                )


def _check_slot_cover(regions: tuple[Region, ...]) -> None:
    owner: list[str | None] = [None] * SLOT_COUNT
    for region in regions:
        for shard in region.shards:
            for r in shard.slots:
                for slot in range(r.lo, r.hi + 1):
                    if owner[slot] is not None:
                        raise TopologyError(
                            f"{region.source}: shards.slots: slot {slot} of shard {shard.name!r} "
                            f"is also owned by shard {owner[slot]!r}"
                        )
                    owner[slot] = shard.name
    missing = [slot for slot, o in enumerate(owner) if o is None]
    if missing:
        raise TopologyError(
            f"{regions[0].source.rsplit('/', 1)[0]}: shards.slots: {len(missing)} slots owned by no shard, "
            f"first {missing[0]}"
        )


def _str(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TopologyError(f"{path}: {where}: a non-empty string is required, got {value!r}")
    return value


def _no_unknown_keys(path: Path, prefix: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise TopologyError(f"{path}: {prefix}{unknown[0]}: unknown field (allowed: {sorted(allowed)})")
