-- Webhook rows of a slot are written only by the shard that owns the slot (issue 11). A slot move's verify now
-- compares, under the freeze, only the rows that differed before it or that the catch-up copied since
-- (app/placement/mover.py, Mover.verify_changed). That is sound only if nothing but the mover writes the target's
-- copies of the range, and nothing writes the frozen source's rows after the last catch-up. Every client write
-- is fenced by txr_owns. These webhook functions were not: the delivery worker's feed position update, its
-- attempt records, the retention cleanup and the operators' enable/retry wrote any endpoint's rows, so a target
-- shard's worker advanced the feed position of an endpoint it had only copied, and a frozen source's worker
-- recorded attempts on the range after the last catch-up. Each now leaves alone a row whose slot this shard does
-- not own (`owned`: not frozen, not moved, not a copy). What is skipped is done again by the owner: an attempt not
-- recorded leaves its delivery pending, which the new owner delivers again when its lease ends (deliveries are
-- at least once); its feed position is the source's copy, which goes on from where it was.

create or replace function txr_webhook_set_state(p_id text, p_state text, p_reason text) returns boolean
language plpgsql as $$
begin
    update webhook_endpoints
    set state = p_state,
        disabled_reason = case when p_state = 'disabled' then p_reason end,
        disabled_at = case when p_state = 'disabled' then clock_timestamp() end
    where id = p_id and txr_event_slot_owned(slot);
    return found;
end $$;

create or replace function txr_webhook_ingest(p_id text, p_position jsonb, p_events jsonb) returns integer
language plpgsql as $$
declare
    v_added integer;
begin
    insert into webhook_deliveries (endpoint_id, slot, event_id, event_type, body, event_created_at)
    select p_id, w.slot, e ->> 'id', e ->> 'type', e ->> 'body', (e ->> 'created_at')::timestamptz
    from jsonb_array_elements(p_events) e, webhook_endpoints w
    where w.id = p_id and txr_event_slot_owned(w.slot)
    on conflict do nothing;
    get diagnostics v_added = row_count;
    update webhook_endpoints set feed_position = feed_position || p_position
    where id = p_id and txr_event_slot_owned(slot);
    return v_added;
end $$;

create or replace function txr_webhook_attempted(
    p_endpoint text, p_event text, p_attempt integer, p_status integer, p_latency_ms integer, p_error text,
    p_outcome text, p_delay_ms integer, p_disable_reason text
) returns void language plpgsql as $$
begin
    assert p_outcome in ('delivered', 'retry', 'failed'), p_outcome;
    if not exists (select 1 from webhook_endpoints w where w.id = p_endpoint and txr_event_slot_owned(w.slot)) then
        return;
    end if;
    insert into webhook_attempts (endpoint_id, slot, event_id, attempt, status, latency_ms, error)
    select p_endpoint, w.slot, p_event, p_attempt, p_status, p_latency_ms, p_error
    from webhook_endpoints w where w.id = p_endpoint;
    update webhook_deliveries
    set state = case p_outcome when 'retry' then 'pending' else p_outcome end,
        next_attempt_at = case when p_outcome = 'retry'
                               then clock_timestamp() + make_interval(secs => p_delay_ms / 1000.0)
                               else next_attempt_at end,
        last_status = p_status,
        last_error = p_error,
        delivered_at = case when p_outcome = 'delivered' then clock_timestamp() end
    where endpoint_id = p_endpoint and event_id = p_event;
    if p_disable_reason is not null then
        perform txr_webhook_set_state(p_endpoint, 'disabled', p_disable_reason);
    end if;
end $$;

create or replace function txr_webhook_retry(p_id text) returns integer language plpgsql as $$
declare
    v_count integer;
begin
    update webhook_deliveries
    set state = 'pending', next_attempt_at = clock_timestamp(), attempts = 0
    where endpoint_id = p_id and state in ('pending', 'failed') and txr_event_slot_owned(slot);
    get diagnostics v_count = row_count;
    return v_count;
end $$;

create or replace function txr_webhook_cleanup(p_before timestamptz, p_limit integer) returns integer
language plpgsql as $$
declare
    v_deleted integer;
begin
    assert p_limit > 0, 'an unbounded cleanup';
    delete from webhook_deliveries where (endpoint_id, event_id) in (
        select endpoint_id, event_id from webhook_deliveries
        where state <> 'pending' and created_at < p_before and txr_event_slot_owned(slot) limit p_limit);
    get diagnostics v_deleted = row_count;
    delete from webhook_attempts where id in (
        select a.id from webhook_attempts a where a.at < p_before and txr_event_slot_owned(a.slot) limit p_limit);
    return v_deleted;
end $$;
