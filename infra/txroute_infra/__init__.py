"""The txroute deployment as Pulumi components: one regional cell per file in `regions/`, a peering mesh
between the cells and a global entry (AWS Global Accelerator) in front of every region's router.

`program.deploy(topology, config)` builds everything; `infra/__main__.py` only calls it. Tests call it under
`pulumi.runtime.set_mocks` with a topology loaded from any folder.
"""
