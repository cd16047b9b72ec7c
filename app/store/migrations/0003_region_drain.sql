-- Draining a region (runbooks, `txroute ops drain`): while `draining_since` is set, the region refuses new
-- public writes with 503 `region_draining` and Retry-After, and routers learn it from `/internal/shardmap`
-- and answer for it. Reads and internal saga messages continue, so sagas in flight finish. The flag lives
-- in each shard database of the region, where the data is (DESIGN D2): any router or region process reads
-- the same answer, and it survives restarts.
alter table shard_info
    add column draining_since timestamptz,
    add column drain_reason text check (drain_reason is null or length(drain_reason) <= 200);
