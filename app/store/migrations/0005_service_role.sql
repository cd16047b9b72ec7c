-- Least privilege (DESIGN D8): the regional services connect as a role that may read and call the ledger
-- functions, never write a table itself. Every write the Python code made with its own SQL becomes a function
-- here, so that the functions are the only way in. The functions are made SECURITY DEFINER (they run as the
-- owner, with a pinned search_path) and granted to the service role by provisioning, after all migrations
-- (app/store/provision.py: grant_service_role), so functions added by later migrations are covered as well.

-- `txroute ops drain` / `undrain` (migration 0003). A null reason undrains.
create function txr_region_drain(p_reason text) returns void language plpgsql as $$
begin
    if p_reason is null then
        update shard_info set draining_since = null, drain_reason = null;
    else
        update shard_info set draining_since = coalesce(draining_since, clock_timestamp()), drain_reason = p_reason;
    end if;
end $$;

-- `txroute audit` records its result (migration 0004) and keeps the last p_kept runs.
create function txr_audit_record(p_clean boolean, p_violations integer, p_failed_checks text[], p_kept integer)
returns void language plpgsql as $$
begin
    insert into audit_runs (clean, violations, failed_checks) values (p_clean, p_violations, p_failed_checks);
    delete from audit_runs where id <= (select max(id) from audit_runs) - p_kept;
end $$;
