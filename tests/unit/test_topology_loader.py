"""The topology loader accepts `regions/` as shipped and refuses each kind of bad edit with an error that
names the file and the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.topology.loader import DEFAULT_REGIONS_DIR, TopologyError, load_topology
from app.topology.model import SLOT_COUNT

CAPACITY = """
[capacity]
db_instance_class = "db.r6gd.large"
db_allocated_storage_gb = 400
db_max_connections = 400
region_service_tasks = 2
router_tasks = 2
task_cpu = 1024
task_memory_mib = 2048
"""


def region_toml(name: str, cidr: str, shards: dict[str, list[str]], *, extra: str = "") -> str:
    text = f'name = "{name}"\nvpc_cidr = "{cidr}"\n{extra}\n{CAPACITY}'
    for shard, slots in shards.items():
        quoted = ", ".join(f'"{s}"' for s in slots)
        text += f'\n[[shards]]\nname = "{shard}"\nslots = [{quoted}]\n'
    return text


def write_regions(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def two_regions(
    *,
    a_shards: dict[str, list[str]] | None = None,
    b_shards: dict[str, list[str]] | None = None,
    b_cidr: str = "10.20.0.0/16",
    b_extra: str = "",
) -> dict[str, str]:
    """A valid two-region topology, with parts overridable to break it."""
    return {
        "eu-north-1.toml": region_toml("eu-north-1", "10.10.0.0/16", a_shards or {"eun1-a": ["0-2047"]}),
        "eu-west-1.toml": region_toml(
            "eu-west-1", b_cidr, b_shards or {"euw1-a": ["2048-4095"]}, extra=b_extra
        ),
    }


def load_error(folder: Path) -> str:
    with pytest.raises(TopologyError) as caught:
        load_topology(folder)
    return str(caught.value)


def test_shipped_regions_load_and_cover_every_slot_once() -> None:
    topology = load_topology()
    assert {r.name for r in topology.regions} == {p.stem for p in DEFAULT_REGIONS_DIR.glob("*.toml")}
    covered = [slot for shard in topology.shards for r in shard.slots for slot in range(r.lo, r.hi + 1)]
    assert sorted(covered) == list(range(SLOT_COUNT)), "expected every slot owned by exactly one shard"
    for slot in (0, SLOT_COUNT - 1):
        assert topology.shard_for_slot(slot).owns(slot)


def test_a_copy_of_the_shipped_regions_loads_identically(tmp_path: Path) -> None:
    copy = tmp_path / "regions"
    shutil.copytree(DEFAULT_REGIONS_DIR, copy)
    assert [r.shards for r in load_topology(copy).regions] == [r.shards for r in load_topology().regions]


def test_synthetic_valid_topology_loads(tmp_path: Path) -> None:
    topology = load_topology(write_regions(tmp_path, two_regions()))
    assert topology.shard_for_slot(2047).name == "eun1-a"
    assert topology.shard_for_slot(2048).name == "euw1-a"


def test_overlapping_slots_are_refused_naming_file_and_field(tmp_path: Path) -> None:
    message = load_error(write_regions(tmp_path, two_regions(b_shards={"euw1-a": ["2000-4095"]})))
    assert "eu-west-1.toml" in message and "shards.slots" in message and "slot 2000" in message, message


def test_missing_slots_are_refused_naming_field(tmp_path: Path) -> None:
    message = load_error(write_regions(tmp_path, two_regions(b_shards={"euw1-a": ["2048-4094"]})))
    assert "shards.slots" in message and "owned by no shard" in message and "4095" in message, message
    assert str(tmp_path) in message, f"expected the folder named, got {message}"


def test_overlapping_cidrs_are_refused_naming_file_and_field(tmp_path: Path) -> None:
    message = load_error(write_regions(tmp_path, two_regions(b_cidr="10.10.0.0/17")))
    assert "eu-west-1.toml" in message and "vpc_cidr" in message and "overlaps" in message, message


def test_duplicate_shard_names_are_refused_naming_file_and_field(tmp_path: Path) -> None:
    message = load_error(write_regions(tmp_path, two_regions(b_shards={"eun1-a": ["2048-4095"]})))
    assert "eu-west-1.toml" in message and "shards.name" in message and "'eun1-a'" in message, message


def test_duplicate_shard_names_within_one_region_are_refused(tmp_path: Path) -> None:
    shards = {"eun1-a": ["0-2047"]}
    files = two_regions(a_shards=shards)
    files["eu-north-1.toml"] += '\n[[shards]]\nname = "eun1-a"\nslots = ["2048-2050"]\n'
    message = load_error(write_regions(tmp_path, files))
    assert "eu-north-1.toml" in message and "shards" in message and "eun1-a" in message, message


@pytest.mark.parametrize(
    ("extra", "field"),
    [('colour = "blue"', "colour"), ("", "capacity.spare_cpu"), ("", "shards[0].weight")],
)
def test_unknown_fields_are_refused_naming_file_and_field(tmp_path: Path, extra: str, field: str) -> None:
    files = two_regions(b_extra=extra)
    if field == "capacity.spare_cpu":
        files["eu-west-1.toml"] = files["eu-west-1.toml"].replace("task_cpu = 1024", "task_cpu = 1024\nspare_cpu = 1")
    if field == "shards[0].weight":
        files["eu-west-1.toml"] += "weight = 3\n"
    message = load_error(write_regions(tmp_path, files))
    assert "eu-west-1.toml" in message and f"{field}: unknown field" in message, message


@pytest.mark.parametrize("bad_range", ["10-5", "0-4096", "-1-5", "a-b", "7", "0 - 10", "00000-1"])
def test_bad_slot_ranges_are_refused_naming_file_and_field(tmp_path: Path, bad_range: str) -> None:
    message = load_error(write_regions(tmp_path, two_regions(b_shards={"euw1-a": [bad_range, "2048-4095"]})))
    assert "eu-west-1.toml" in message and "shards[0].slots[0]" in message and repr(bad_range) in message, message


def test_region_name_must_match_its_file_name(tmp_path: Path) -> None:
    files = two_regions()
    files["eu-west-2.toml"] = files.pop("eu-west-1.toml")
    message = load_error(write_regions(tmp_path, files))
    assert "eu-west-2.toml" in message and "name:" in message and "must match the file name" in message, message


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    assert "no region files" in load_error(tmp_path)


def test_invalid_toml_is_refused_naming_the_file(tmp_path: Path) -> None:
    files = two_regions()
    files["eu-west-1.toml"] += "\nthis is not toml ==\n"
    message = load_error(write_regions(tmp_path, files))
    assert "eu-west-1.toml" in message and "not valid TOML" in message, message


def test_non_positive_capacity_is_refused_naming_the_field(tmp_path: Path) -> None:
    files = two_regions()
    files["eu-west-1.toml"] = files["eu-west-1.toml"].replace("router_tasks = 2", "router_tasks = 0")
    message = load_error(write_regions(tmp_path, files))
    assert "eu-west-1.toml" in message and "capacity.router_tasks" in message, message


@pytest.mark.parametrize("instance_class", ["db.r6g.large", "db.r5.xlarge", "db.t4g.medium", "r6gd.large", "db.r6gd"])
def test_classes_rds_does_not_offer_for_multi_az_db_clusters_are_refused(tmp_path: Path, instance_class: str) -> None:
    files = two_regions()
    files["eu-west-1.toml"] = files["eu-west-1.toml"].replace('"db.r6gd.large"', f'"{instance_class}"')
    message = load_error(write_regions(tmp_path, files))
    assert "eu-west-1.toml" in message and "capacity.db_instance_class" in message, message
    assert "Multi-AZ DB clusters" in message, message


@pytest.mark.parametrize("instance_class", ["db.m6gd.large", "db.r6gd.2xlarge", "db.c6gd.medium", "db.x2iedn.xlarge"])
def test_multi_az_db_cluster_classes_are_accepted(tmp_path: Path, instance_class: str) -> None:
    files = two_regions()
    files["eu-west-1.toml"] = files["eu-west-1.toml"].replace('"db.r6gd.large"', f'"{instance_class}"')
    region = load_topology(write_regions(tmp_path, files)).region("eu-west-1")
    assert region.capacity.db_instance_class == instance_class


def test_storage_below_the_gp3_explicit_iops_minimum_is_refused(tmp_path: Path) -> None:
    files = two_regions()
    files["eu-west-1.toml"] = files["eu-west-1.toml"].replace(
        "db_allocated_storage_gb = 400", "db_allocated_storage_gb = 399")
    message = load_error(write_regions(tmp_path, files))
    assert "eu-west-1.toml" in message and "capacity.db_allocated_storage_gb" in message and "400" in message
