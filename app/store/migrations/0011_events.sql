-- Events and webhooks (DESIGN D16, issue 13).
--
-- Every state change of a transfer or a customer account writes its event in the transaction that makes the
-- change: triggers on `transfers` (insert, update of state) and `accounts` (insert, update of status), so
-- every writer (the posting functions, the saga, holds, batches) is covered without being rewritten, and no
-- committed change lacks its event (the outbox pattern).
--
-- The feed's order is (xid, seq): the writing transaction's id, then the event's sequence inside it. A reader
-- hands out only events whose transaction id is below the xmin of its own snapshot (pg_snapshot_xmin): every
-- transaction below it has ended, so no event can ever appear later before a position already handed out.
-- A plain sequence would not do: sequence numbers are taken at insert and commit out of order, so a reader
-- that saw 11 committed and advanced past it would skip 10 committing a moment later. The price: a long
-- transaction anywhere in the cluster holds the feed back (bounded by the statement and idle-in-transaction
-- timeouts), never a skip or a repeat. The events of one resource (a transfer's states, an account's opening
-- and closing) come in order, as each change starts after the one before committed.

create table events (
    seq bigserial primary key,
    xid xid8 not null default pg_current_xact_id(),
    id text not null unique,
    type text not null,
    client text not null,
    slot integer not null check (slot between 0 and 4095),
    resource_id text not null,
    data jsonb not null,
    created_at timestamptz not null default clock_timestamp()
);
create index events_feed on events (client, xid, seq);
create index events_created on events (created_at);

-- Crockford base32 of the low 5*p_chars bits of p_value (ULID's alphabet, app/topology/ids.py).
create function txr_base32(p_value bigint, p_chars integer) returns text language plpgsql immutable as $$
declare
    v_out text := '';
    v_left bigint := p_value;
begin
    for i in 1..p_chars loop
        v_out := substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', (v_left & 31)::integer + 1, 1) || v_out;
        v_left := v_left >> 5;
    end loop;
    return v_out;
end $$;

-- `evt_` + the slot (3 hex digits) + a ULID: 48 bits of milliseconds in 10 characters, 80 random bits in 16.
-- The random bits only make ids unique (they are no secret), so random() is enough.
create function txr_event_id(p_slot integer) returns text language plpgsql volatile as $$
begin
    return 'evt_' || lpad(to_hex(p_slot), 3, '0')
        || txr_base32((extract(epoch from clock_timestamp()) * 1000)::bigint, 10)
        || txr_base32(floor(random() * 1099511627776)::bigint, 8)
        || txr_base32(floor(random() * 1099511627776)::bigint, 8);
end $$;

create function txr_event_write(p_type text, p_client text, p_slot integer, p_resource text, p_data jsonb)
returns void language plpgsql as $$
begin
    insert into events (id, type, client, slot, resource_id, data)
    values (txr_event_id(p_slot), p_type, p_client, p_slot, p_resource, p_data);
end $$;

-- Only the owner of a slot announces its changes. A slot move (migration 0008, app/store/slotdata.py) copies
-- accounts and transfers into a target shard that does not own their slot yet: those copies are no change, and
-- write no event (nor do the move's balancing postings, kind `move`, which no client made). Events stay on the
-- shard that wrote them (the table is not moved with its slot): the feed reads every shard, so a move neither
-- skips nor repeats an event, and the new owner's later events come from its own stream.
create function txr_event_slot_owned(p_slot integer) returns boolean language plpgsql stable as $$
begin
    return exists (select 1 from slot_ownership where p_slot between slot_lo and slot_hi and state = 'owned');
end $$;

-- A transfer's event type from its change. Insert: its first state (posted, pending, held). Update:
-- pending -> posted is `transfer.posted`; out of `held` into posted or pending is `transfer.captured`; any
-- other new state names its event (`returned`, `voided`, `expired`). The credit side of a cross-shard transfer
-- (inserted `posted` by txr_saga_apply, its debit shard elsewhere) writes none: the debit shard announces the
-- transfer when it settles, so its client sees one transfer.posted per transfer, not one per side.
create function txr_transfer_event() returns trigger language plpgsql as $$
declare
    v_type text;
    v_slot integer := txr_id_slot(new.id);
begin
    if new.kind = 'move' or not txr_event_slot_owned(v_slot) then
        return null;
    end if;
    if tg_op = 'INSERT' then
        if new.debit_shard is not null and new.state = 'posted'
           and new.debit_shard is distinct from (select shard from shard_info) then
            return null;
        end if;
        v_type := 'transfer.' || new.state;
    elsif old.state = 'held' and new.state in ('posted', 'pending') then
        v_type := 'transfer.captured';
    else
        v_type := 'transfer.' || new.state;
    end if;
    perform txr_event_write(v_type, new.client, v_slot, new.id, txr_transfer_body(new));
    return null;
end $$;
create trigger transfers_event_insert after insert on transfers
    for each row execute function txr_transfer_event();
create trigger transfers_event_state after update of state on transfers
    for each row when (old.state is distinct from new.state) execute function txr_transfer_event();

create function txr_account_event() returns trigger language plpgsql as $$
begin
    if not txr_event_slot_owned(new.slot) then
        return null;
    end if;
    perform txr_event_write(
        case when tg_op = 'INSERT' then 'account.opened' else 'account.' || new.status end,
        new.owner_client, new.slot, new.id, txr_account_body(new));
    return null;
end $$;
create trigger accounts_event_insert after insert on accounts
    for each row when (new.kind = 'customer') execute function txr_account_event();
create trigger accounts_event_status after update of status on accounts
    for each row when (new.kind = 'customer' and old.status is distinct from new.status)
    execute function txr_account_event();

-- Retention: deletes at most p_limit events created before p_before, oldest first; returns how many.
create function txr_events_cleanup(p_before timestamptz, p_limit integer) returns integer
language plpgsql as $$
declare
    v_deleted integer;
begin
    assert p_limit > 0, 'an unbounded cleanup';
    delete from events where seq in (
        select seq from events where created_at < p_before order by created_at limit p_limit
    );
    get diagnostics v_deleted = row_count;
    return v_deleted;
end $$;

-- Webhook endpoints (issue 13) live on the shard owning their client's home slot (a hash of the client,
-- app/events/webhooks.py), like an account: the id embeds that slot, so every router finds it through the
-- shard map, and one region's worker delivers all of an endpoint's events, read from every shard's feed.
-- `feed_position` is how far that worker has read the feed into webhook_deliveries (per shard).
create table webhook_endpoints (
    id text primary key,
    slot integer not null check (slot between 0 and 4095),
    client text not null,
    url text not null,
    event_types text[],
    description text,
    secret text not null,
    previous_secret text,
    previous_secret_until timestamptz,
    state text not null default 'enabled' check (state in ('enabled', 'disabled')),
    disabled_reason text,
    disabled_at timestamptz,
    feed_position jsonb not null default '{}'::jsonb,
    created_at timestamptz not null default clock_timestamp()
);
create index webhook_endpoints_client on webhook_endpoints (client, created_at);

-- One row per (endpoint, event): the body is stored as the exact text sent, so every attempt signs and sends
-- the same bytes under the same webhook-id.
create table webhook_deliveries (
    endpoint_id text not null references webhook_endpoints (id) on delete cascade,
    slot integer not null check (slot between 0 and 4095),  -- the endpoint's: they move together
    event_id text not null,
    event_type text not null,
    body text not null,
    event_created_at timestamptz not null,
    state text not null default 'pending' check (state in ('pending', 'delivered', 'failed')),
    attempts integer not null default 0 check (attempts >= 0),
    next_attempt_at timestamptz not null default clock_timestamp(),
    last_status integer,
    last_error text,
    delivered_at timestamptz,
    created_at timestamptz not null default clock_timestamp(),
    primary key (endpoint_id, event_id)
);
create index webhook_deliveries_due on webhook_deliveries (next_attempt_at) where state = 'pending';

create table webhook_attempts (
    id uuid primary key default gen_random_uuid(),  -- not a sequence: rows keep their id when their slot moves
    endpoint_id text not null references webhook_endpoints (id) on delete cascade,
    slot integer not null check (slot between 0 and 4095),
    event_id text not null,
    attempt integer not null,
    at timestamptz not null default clock_timestamp(),
    status integer,
    latency_ms integer not null,
    error text
);
create index webhook_attempts_endpoint on webhook_attempts (endpoint_id, at desc);

-- Endpoints, their deliveries and attempts move with the home slot (app/store/slotdata.py registers them).
create trigger webhook_endpoints_move_log after insert or update on webhook_endpoints
    for each row execute function txr_move_log('column', 'slot', 'id');
create trigger webhook_deliveries_move_log after insert or update on webhook_deliveries
    for each row execute function txr_move_log('column', 'slot', 'endpoint_id', 'event_id');
create trigger webhook_attempts_move_log after insert or update on webhook_attempts
    for each row execute function txr_move_log('column', 'slot', 'id');

create function txr_webhook_body(e webhook_endpoints) returns jsonb language plpgsql stable as $$
begin
    return jsonb_build_object(
        'id', e.id, 'url', e.url, 'event_types', to_jsonb(e.event_types), 'description', e.description,
        'state', e.state, 'disabled_reason', e.disabled_reason, 'created_at', txr_ts(e.created_at));
end $$;

-- Registers an endpoint, idempotent by the client's key. The secret is shown in this answer only (GET never
-- shows it); the stored answer holds it too, so a retry after a lost answer still learns it (the secret is in
-- webhook_endpoints anyway: deliveries are signed with it).
create function txr_webhook_create(p jsonb) returns jsonb language plpgsql as $$
declare
    v_slot integer := (p ->> 'slot')::integer;
    v_prior jsonb;
    v_endpoint webhook_endpoints;
begin
    if not txr_owns(v_slot) then
        return txr_misdirected(v_slot);
    end if;
    v_prior := txr_idempotency_check(p ->> 'client', p ->> 'key', p ->> 'fingerprint');
    if v_prior is not null then
        return v_prior;
    end if;
    if (select count(*) from webhook_endpoints where client = p ->> 'client') >= (p ->> 'endpoints_max')::integer then
        return txr_idempotency_store(p ->> 'client', p ->> 'key', p ->> 'fingerprint',
            txr_refusal(422, 'webhook_endpoints_limit',
                format('a client may register at most %s webhook endpoints', p ->> 'endpoints_max')));
    end if;
    insert into webhook_endpoints (id, slot, client, url, event_types, description, secret)
    values (p ->> 'id', v_slot, p ->> 'client', p ->> 'url',
            case when jsonb_typeof(p -> 'event_types') = 'array' then
                (select array_agg(t order by t) from jsonb_array_elements_text(p -> 'event_types') t) end,
            p ->> 'description', p ->> 'secret')
    returning * into v_endpoint;
    return txr_idempotency_store(p ->> 'client', p ->> 'key', p ->> 'fingerprint',
        jsonb_build_object('status', 201,
                           'body', txr_webhook_body(v_endpoint) || jsonb_build_object('secret', v_endpoint.secret)));
end $$;

create function txr_webhook_delete(p_id text, p_client text) returns boolean language plpgsql as $$
begin
    delete from webhook_endpoints where id = p_id and client = p_client;
    return found;
end $$;

-- A new secret, idempotent by the client's key (a retried rotation must not rotate twice, which would drop the
-- secret the receiver still verifies with); the one it replaces still signs, a second signature, p_overlap_s.
create function txr_webhook_rotate(p jsonb) returns jsonb language plpgsql as $$
declare
    v_prior jsonb;
    v_endpoint webhook_endpoints;
begin
    if not txr_owns((p ->> 'slot')::integer) then
        return txr_misdirected((p ->> 'slot')::integer);
    end if;
    v_prior := txr_idempotency_check(p ->> 'client', p ->> 'key', p ->> 'fingerprint');
    if v_prior is not null then
        return v_prior;
    end if;
    update webhook_endpoints
    set previous_secret = secret,
        previous_secret_until = clock_timestamp() + make_interval(secs => (p ->> 'overlap_s')::integer),
        secret = p ->> 'secret'
    where id = p ->> 'id' and client = p ->> 'client'
    returning * into v_endpoint;
    if not found then
        return txr_refusal(404, 'webhook_endpoint_not_found', format('webhook endpoint %s was not found', p ->> 'id'));
    end if;
    return txr_idempotency_store(p ->> 'client', p ->> 'key', p ->> 'fingerprint',
        jsonb_build_object('status', 200,
                           'body', txr_webhook_body(v_endpoint) || jsonb_build_object('secret', v_endpoint.secret)));
end $$;

-- Operators (`txroute ops webhooks`) and the worker: disable with a reason, or enable again.
create function txr_webhook_set_state(p_id text, p_state text, p_reason text) returns boolean
language plpgsql as $$
begin
    update webhook_endpoints
    set state = p_state,
        disabled_reason = case when p_state = 'disabled' then p_reason end,
        disabled_at = case when p_state = 'disabled' then clock_timestamp() end
    where id = p_id;
    return found;
end $$;

-- The worker read the feed for this endpoint: its events become deliveries and the position advances, in one
-- transaction, so an event is queued exactly once per endpoint whatever crashes in between.
create function txr_webhook_ingest(p_id text, p_position jsonb, p_events jsonb) returns integer
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
    update webhook_endpoints set feed_position = feed_position || p_position where id = p_id;
    return v_added;
end $$;

-- Claims due deliveries of enabled endpoints, at most p_per_endpoint each (their in-flight room), leasing
-- them for p_lease_ms: after a crash they are due again once the lease ends (at least once).
create function txr_webhook_claim(p_rooms jsonb, p_limit integer, p_lease_ms integer)
returns table (endpoint_id text, event_id text, body text, attempts integer, url text, secret text,
               previous_secret text, event_created_at timestamptz)
language plpgsql as $$
begin
    return query
    with due as (
        select d.endpoint_id, d.event_id,
               row_number() over (partition by d.endpoint_id order by d.next_attempt_at) as n
        from webhook_deliveries d join webhook_endpoints w on w.id = d.endpoint_id
        where d.state = 'pending' and d.next_attempt_at <= clock_timestamp() and w.state = 'enabled'
          and txr_event_slot_owned(w.slot)  -- a moved endpoint is delivered by its new shard only
        order by d.next_attempt_at
        limit p_limit * 4
    ), chosen as (
        select due.endpoint_id, due.event_id from due
        where due.n <= coalesce((p_rooms ->> due.endpoint_id)::integer, (p_rooms ->> '*')::integer)
        limit p_limit
    )
    update webhook_deliveries d
    set next_attempt_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
        attempts = d.attempts + 1
    from chosen, webhook_endpoints w
    where d.endpoint_id = chosen.endpoint_id and d.event_id = chosen.event_id and w.id = d.endpoint_id
    returning d.endpoint_id, d.event_id, d.body, d.attempts, w.url, w.secret,
              case when w.previous_secret_until > clock_timestamp() then w.previous_secret end,
              d.event_created_at;
end $$;

-- Records one attempt. p_outcome: 'delivered'; 'retry' (due again after p_delay_ms); 'failed' (the schedule
-- is over, or the endpoint answered 410: p_disable_reason then disables the endpoint, recording why).
create function txr_webhook_attempted(
    p_endpoint text, p_event text, p_attempt integer, p_status integer, p_latency_ms integer, p_error text,
    p_outcome text, p_delay_ms integer, p_disable_reason text
) returns void language plpgsql as $$
begin
    assert p_outcome in ('delivered', 'retry', 'failed'), p_outcome;
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

-- `txroute ops webhooks retry`: failed (and pending) deliveries of an endpoint are due now, schedule restarted.
create function txr_webhook_retry(p_id text) returns integer language plpgsql as $$
declare
    v_count integer;
begin
    update webhook_deliveries
    set state = 'pending', next_attempt_at = clock_timestamp(), attempts = 0
    where endpoint_id = p_id and state in ('pending', 'failed');
    get diagnostics v_count = row_count;
    return v_count;
end $$;

-- Bounded cleanup of finished deliveries and their attempts past retention.
create function txr_webhook_cleanup(p_before timestamptz, p_limit integer) returns integer
language plpgsql as $$
declare
    v_deleted integer;
begin
    assert p_limit > 0, 'an unbounded cleanup';
    delete from webhook_deliveries where (endpoint_id, event_id) in (
        select endpoint_id, event_id from webhook_deliveries
        where state <> 'pending' and created_at < p_before limit p_limit);
    get diagnostics v_deleted = row_count;
    delete from webhook_attempts where id in (select a.id from webhook_attempts a where a.at < p_before limit p_limit);
    return v_deleted;
end $$;
