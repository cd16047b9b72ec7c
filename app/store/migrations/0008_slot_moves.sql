-- Slot moves (issue 11, DESIGN D13): the ownership recorded here is the truth, `regions/` the desired state.
--
-- A move of slots LO-HI from a source shard to a target shard is driven by a client-side mover (`txroute slots
-- move`, app/placement/mover.py) through a state machine recorded in `slot_moves` on both databases:
--
--   copying -> catching_up -> frozen -> switching -> switched -> done        (source)
--   copying ------------------------------------> switched -> done        (target)
--   any phase before `switching` -> cancelled | aborted (the source unfrozen, the target's copies dropped)
--
-- Ownership gains two states: `moving` (frozen: every request for the range is answered 503 slot_moving and
-- nothing commits) and `moved` (the range left: 421 naming `owner_shard` / `owner_region`).
--
-- Money moves by balancing postings, not by copying journals. Under the freeze the source books one `move`
-- transfer per account with a balance (the account to zero, against its transit account towards the target,
-- trn_<source>_<target>_<currency>), the target books the mirror (the account from zero to the same balance,
-- against trn_<target>_<source>_<currency>). Every per-shard invariant of the audit stays true as it is
-- (each shard's customers + transit = its deposits - withdrawals; every account equals its own journal), and
-- the move's transit entries on both sides sum to zero once it is switched, as a saga's do. The journal written
-- before the move stays on the source (its accounts archived at zero, unreachable since the slot is `moved`);
-- the target's journal of a moved account starts with its `move` entry. Transfers, their events, stored
-- idempotent answers and saga inbox rows of the range are copied (a copied transfer is marked `moved_from` and
-- carries no entries on the target), so reads, replays and duplicate saga deliveries answer the same there.

alter table slot_ownership drop constraint slot_ownership_state_check;
alter table slot_ownership
    add constraint slot_ownership_state_check check (state in ('owned', 'moving_out', 'moving', 'moved')),
    add column owner_shard text,
    add column owner_region text,
    add column move_id text,
    add constraint slot_ownership_moved_names_owner check ((state = 'moved') = (owner_shard is not null));

alter table transfers drop constraint transfers_kind_check;
alter table transfers
    add constraint transfers_kind_check check (kind in ('transfer', 'deposit', 'withdrawal', 'move')),
    -- Set on a copy made by a move (the shard it came from): the journal of that transfer stays there.
    add column moved_from text;

-- The slot embedded in an account or transfer id (acc_/trf_ + 3 hex digits, app/topology/ids.py).
create function txr_id_slot(p_id text) returns integer language plpgsql immutable as $$
begin
    if p_id !~ '^(acc|trf)_[0-9a-f]{3}' then
        return null;
    end if;
    return ('x' || substr(p_id, 5, 3))::bit(12)::integer;
end $$;

-- A move reads its range's rows by slot (copy, and verify under the freeze): indexed, so both cost the range's
-- size, not the shard's.
create index accounts_slot on accounts (slot);
create index transfers_id_slot on transfers (txr_id_slot(id));
create index transfer_events_id_slot on transfer_events (txr_id_slot(transfer_id));
create index inbox_credit_slot on inbox (txr_id_slot(credit_account));

-- Every stored answer records the slot of its request, so it can move with the slot (DESIGN D5, D13). The
-- ownership check (txr_owns) runs first in every write and leaves the slot in a transaction-local setting.
alter table idempotency add column slot integer check (slot between 0 and 4095);
update idempotency set slot = txr_id_slot(body ->> 'id') where slot is null;
create index idempotency_slot on idempotency (slot);
create function txr_idempotency_slot() returns trigger language plpgsql as $$
begin
    new.slot := coalesce(new.slot, nullif(current_setting('txr.slot', true), '')::integer);
    return new;
end $$;
create trigger idempotency_slot before insert on idempotency
    for each row execute function txr_idempotency_slot();

-- The ownership fence under a row lock (issue 11): FOR SHARE makes the freeze (an UPDATE of the row) wait for
-- every posting that passed the fence, and every posting after it see `moving`. So no write commits on a frozen
-- range. VOLATILE because of the lock (a STABLE function may not lock rows); provisioning then makes it
-- SECURITY DEFINER like every writing function (the service role has no UPDATE privilege FOR SHARE needs).
-- A second look, in a new snapshot, covers a row split by a move while this one waited on it.
create or replace function txr_owns(p_slot integer) returns boolean language plpgsql volatile as $$
begin
    perform set_config('txr.slot', p_slot::text, true);
    perform 1 from slot_ownership where p_slot between slot_lo and slot_hi and state = 'owned' for share;
    if found then
        return true;
    end if;
    perform 1 from slot_ownership where p_slot between slot_lo and slot_hi and state = 'owned' for share;
    return found;
end $$;

-- The refusal for a slot not owned here: 503 slot_moving while it is frozen (nothing was written, retry after a
-- second), 421 naming the owner once it has moved, a bare 421 for a slot this shard never held.
create or replace function txr_misdirected(p_slot integer) returns jsonb language plpgsql stable as $$
declare
    r slot_ownership;
begin
    select * into r from slot_ownership where p_slot between slot_lo and slot_hi;
    if found and r.state = 'moving' then
        return jsonb_build_object('status', 503, 'body', jsonb_build_object(
            'code', 'slot_moving',
            'detail', format('slot %s is moving to another shard; nothing was written, retry with the same '
                             'Idempotency-Key', p_slot),
            'slot', p_slot));
    end if;
    if found and r.state = 'moved' then
        return jsonb_build_object('status', 421, 'body', jsonb_build_object(
            'code', 'misdirected',
            'detail', format('slot %s moved to shard %s in region %s', p_slot, r.owner_shard, r.owner_region),
            'slot', p_slot, 'owner_shard', r.owner_shard, 'owner_region', r.owner_region));
    end if;
    return jsonb_build_object('status', 421, 'body', jsonb_build_object(
        'code', 'misdirected',
        'detail', format('slot %s is not owned by shard %s', p_slot, (select shard from shard_info)),
        'slot', p_slot));
end $$;

-- One row per move on each side. `balances` is what the source booked out at the switch (account -> minor units),
-- which the target books in; `log_cursor` the last change the catch-up applied.
create table slot_moves (
    id text primary key check (id ~ '^mv_[0-9a-z]{1,40}$'),
    role text not null check (role in ('source', 'target')),
    slot_lo integer not null check (slot_lo between 0 and 4095),
    slot_hi integer not null check (slot_hi between slot_lo and 4095),
    source_shard text not null,
    source_region text not null,
    target_shard text not null,
    target_region text not null,
    phase text not null check (phase in (
        'copying', 'catching_up', 'frozen', 'switching', 'switched', 'done', 'cancelled', 'aborted')),
    epoch bigint not null check (epoch >= 1),  -- the range's epoch after the switch
    rows_copied bigint not null default 0 check (rows_copied >= 0),
    log_cursor bigint not null default 0 check (log_cursor >= 0),
    balances jsonb,
    reason text check (reason is null or length(reason) <= 300),
    created_at timestamptz not null default clock_timestamp(),
    frozen_at timestamptz,
    switched_at timestamptz,
    updated_at timestamptz not null default clock_timestamp()
);
create unique index slot_moves_one_active on slot_moves ((true))
    where role = 'source' and phase in ('copying', 'catching_up', 'frozen', 'switching');

-- The catch-up's change log (issue 11: "a change log written in the same transaction"): while a move of a slot
-- is active on its source, every insert or update of a per-slot row of that slot writes its key here, in the
-- writer's transaction. The mover copies the rows named after its last cursor again. Cheaper than logical
-- replication for this purpose: no slot or publication to manage per move, no WAL retained if the mover dies,
-- it filters by slot at the source, and the rows it names are read in their committed state.
create table slot_move_changes (
    id bigint generated always as identity primary key,
    move_id text not null references slot_moves (id),
    tbl text not null,
    key jsonb not null
);
create index slot_move_changes_move on slot_move_changes (move_id, id);

-- Trigger arguments: how the row's slot is found ('column' NAME: an integer column; 'id' NAME: an id that embeds
-- it), then the key columns. One function for every per-slot table of app/store/slotdata.py.
create function txr_move_log() returns trigger language plpgsql as $$
declare
    v_row jsonb := to_jsonb(new);
    v_slot integer;
    v_move text;
begin
    v_slot := case tg_argv[0]
        when 'id' then txr_id_slot(v_row ->> tg_argv[1])
        else (v_row ->> tg_argv[1])::integer end;
    if v_slot is null then
        return null;
    end if;
    select id into v_move from slot_moves
    where role = 'source' and phase in ('copying', 'catching_up', 'frozen') and v_slot between slot_lo and slot_hi;
    if v_move is null then
        return null;
    end if;
    insert into slot_move_changes (move_id, tbl, key)
    select v_move, tg_table_name, jsonb_object_agg(k, v_row -> k) from unnest(tg_argv[2:tg_nargs - 1]) k;
    return null;
end $$;
create trigger accounts_move_log after insert or update on accounts
    for each row execute function txr_move_log('column', 'slot', 'id');
create trigger transfers_move_log after insert or update on transfers
    for each row execute function txr_move_log('id', 'id', 'id');
create trigger transfer_events_move_log after insert or update on transfer_events
    for each row execute function txr_move_log('id', 'transfer_id', 'transfer_id', 'seq');
create trigger idempotency_move_log after insert or update on idempotency
    for each row execute function txr_move_log('column', 'slot', 'client', 'key');
create trigger inbox_move_log after insert or update on inbox
    for each row execute function txr_move_log('id', 'credit_account', 'transfer_id');

-- Makes p_lo and p_hi + 1 boundaries of the ownership rows, keeping each piece's state.
create function txr_slot_split(p_lo integer, p_hi integer) returns void language plpgsql as $$
declare
    r slot_ownership;
begin
    for r in select * from slot_ownership where slot_lo < p_lo and slot_hi >= p_lo for update loop
        update slot_ownership set slot_hi = p_lo - 1 where slot_lo = r.slot_lo;
        insert into slot_ownership (slot_lo, slot_hi, epoch, state, owner_shard, owner_region, move_id)
        values (p_lo, r.slot_hi, r.epoch, r.state, r.owner_shard, r.owner_region, r.move_id);
    end loop;
    for r in select * from slot_ownership where slot_lo <= p_hi and slot_hi > p_hi for update loop
        update slot_ownership set slot_hi = p_hi where slot_lo = r.slot_lo;
        insert into slot_ownership (slot_lo, slot_hi, epoch, state, owner_shard, owner_region, move_id)
        values (p_hi + 1, r.slot_hi, r.epoch, r.state, r.owner_shard, r.owner_region, r.move_id);
    end loop;
end $$;

-- Records a move on one side (idempotent: the same move again is a no-op). The source must own every slot of
-- the range (`owned`, not frozen by another move); the target must own none of it. Returns the move's row.
create function txr_move_begin(p jsonb) returns jsonb language plpgsql as $$
declare
    v_lo integer := (p ->> 'slot_lo')::integer;
    v_hi integer := (p ->> 'slot_hi')::integer;
    v_role text := p ->> 'role';
    v_prior slot_moves;
    v_owned integer;
    v_row slot_moves;
begin
    perform 1 from shard_info for update;  -- one move begins at a time per shard
    select * into v_prior from slot_moves where id = p ->> 'id';
    if found then
        return jsonb_build_object('ok', true, 'move', to_jsonb(v_prior));
    end if;
    select coalesce(sum(least(slot_hi, v_hi) - greatest(slot_lo, v_lo) + 1), 0) into v_owned
    from slot_ownership where slot_lo <= v_hi and slot_hi >= v_lo and state in ('owned', 'moving');
    if v_role = 'source' then
        if exists (select 1 from slot_ownership where slot_lo <= v_hi and slot_hi >= v_lo and state = 'moving')
           or exists (select 1 from slot_moves where role = 'source'
                      and phase in ('copying', 'catching_up', 'frozen', 'switching')) then
            return jsonb_build_object('ok', false, 'code', 'move_in_progress',
                'detail', 'a move is already in progress on this shard');
        end if;
        if v_owned <> v_hi - v_lo + 1 then
            return jsonb_build_object('ok', false, 'code', 'range_not_owned',
                'detail', format('shard %s does not own all of slots %s-%s', p ->> 'source_shard', v_lo, v_hi));
        end if;
        perform txr_slot_split(v_lo, v_hi);
    else
        if v_owned > 0 then
            return jsonb_build_object('ok', false, 'code', 'target_owns_range',
                'detail', format('shard %s already owns slots of %s-%s', p ->> 'target_shard', v_lo, v_hi));
        end if;
    end if;
    insert into slot_moves (id, role, slot_lo, slot_hi, source_shard, source_region, target_shard, target_region,
                            phase, epoch)
    values (p ->> 'id', v_role, v_lo, v_hi, p ->> 'source_shard', p ->> 'source_region', p ->> 'target_shard',
            p ->> 'target_region', 'copying', (p ->> 'epoch')::bigint)
    returning * into v_row;
    return jsonb_build_object('ok', true, 'move', to_jsonb(v_row));
end $$;

create function txr_move_phase(p_move text, p_phase text, p_reason text default null) returns void
language plpgsql as $$
begin
    update slot_moves set phase = p_phase, reason = coalesce(p_reason, reason), updated_at = clock_timestamp(),
                          frozen_at = case when p_phase = 'frozen' then coalesce(frozen_at, clock_timestamp())
                                           else frozen_at end,
                          switched_at = case when p_phase = 'switched' then clock_timestamp() else switched_at end
    where id = p_move;
end $$;

-- Freeze (source): the range's ownership becomes `moving`. The UPDATE waits for every transaction holding the
-- rows FOR SHARE (postings past the fence) and the caller's lock_timeout bounds that wait.
create function txr_move_freeze(p_move text) returns void language plpgsql as $$
declare
    m slot_moves;
begin
    select * into strict m from slot_moves where id = p_move and role = 'source' for update;
    assert m.phase in ('copying', 'catching_up', 'frozen'), m.phase;
    perform txr_slot_split(m.slot_lo, m.slot_hi);
    update slot_ownership set state = 'moving', move_id = p_move
    where slot_lo between m.slot_lo and m.slot_hi and state = 'owned';
    perform txr_move_phase(p_move, 'frozen');
end $$;

-- Unfreeze (source), when a move is cancelled or aborted before its switch.
create function txr_move_unfreeze(p_move text, p_phase text, p_reason text) returns void language plpgsql as $$
declare
    m slot_moves;
begin
    assert p_phase in ('cancelled', 'aborted'), p_phase;
    select * into strict m from slot_moves where id = p_move and role = 'source' for update;
    assert m.phase in ('copying', 'catching_up', 'frozen', 'cancelled', 'aborted'), m.phase;
    update slot_ownership set state = 'owned', move_id = null where move_id = p_move and state = 'moving';
    delete from slot_move_changes where move_id = p_move;
    perform txr_move_phase(p_move, p_phase, p_reason);
end $$;

-- Switch, first step (source, frozen): book every account of the range to zero against the transit account
-- towards the target, and record the balances. Refuses while sagas debited from the range are still pending
-- (their settlement must happen where their stored answers are; the mover waits, bounded, or aborts).
-- Idempotent: once `switching`, returns the balances recorded the first time.
create function txr_move_switch_out(p_move text) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    a record;
    v_transit text;
    v_transit_balance bigint;
    v_balances jsonb := '{}'::jsonb;
    v_id text;
    v_pending integer;
begin
    select * into strict m from slot_moves where id = p_move and role = 'source' for update;
    if m.phase in ('switching', 'switched', 'done') then
        return jsonb_build_object('ok', true, 'balances', m.balances);
    end if;
    assert m.phase = 'frozen', m.phase;
    select count(*) into v_pending from transfers
    where state = 'pending' and debit_shard = m.source_shard and txr_id_slot(debit_account) between m.slot_lo and m.slot_hi;
    if v_pending > 0 then
        return jsonb_build_object('ok', false, 'pending_sagas', v_pending);
    end if;
    for a in select id, currency, balance from accounts
             where kind = 'customer' and slot between m.slot_lo and m.slot_hi
             order by id for update loop
        v_balances := v_balances || jsonb_build_object(a.id, a.balance);
        continue when a.balance = 0;
        v_transit := 'trn_' || m.source_shard || '_' || m.target_shard || '_' || a.currency;
        insert into accounts (id, slot, kind, owner_client, currency)
        values (v_transit, m.slot_lo, 'transit', 'txroute', a.currency) on conflict (id) do nothing;
        update accounts set balance = balance + a.balance, version = version + 1
        where id = v_transit returning balance into v_transit_balance;
        update accounts set balance = 0, version = version + 1 where id = a.id;
        v_id := 'mvo_' || substr(p_move, 4) || '_' || a.id;
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state)
        values (v_id, 'txroute', 'move',
                case when a.balance > 0 then a.id else v_transit end,
                case when a.balance > 0 then v_transit else a.id end,
                abs(a.balance), a.currency, p_move, 'posted');
        insert into entries (transfer_id, account_id, amount, balance_after)
        values (v_id, a.id, -a.balance, 0), (v_id, v_transit, a.balance, v_transit_balance);
    end loop;
    update slot_moves set balances = v_balances where id = p_move;
    perform txr_move_phase(p_move, 'switching');
    return jsonb_build_object('ok', true, 'balances', v_balances);
end $$;

-- Switch, second step (target): book the recorded balances in (each account from zero), own the range with the
-- new epoch. Idempotent. Refuses (and changes nothing) if a copied account is missing or not at zero.
create function txr_move_switch_in(p_move text, p_balances jsonb) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    b record;
    v_account accounts;
    v_transit text;
    v_transit_balance bigint;
    v_id text;
begin
    select * into strict m from slot_moves where id = p_move and role = 'target' for update;
    if m.phase in ('switched', 'done') then
        return jsonb_build_object('ok', true);
    end if;
    assert m.phase = 'copying', m.phase;
    if exists (select 1 from jsonb_object_keys(p_balances) k left join accounts a on a.id = k
               where a.id is null or a.balance <> 0 or a.kind <> 'customer') then
        return jsonb_build_object('ok', false, 'detail', 'a moved account is missing on the target or not at zero');
    end if;
    for b in select key as id, value::bigint as balance from jsonb_each_text(p_balances) order by key loop
        continue when b.balance = 0;
        select * into strict v_account from accounts where id = b.id for update;
        v_transit := 'trn_' || m.target_shard || '_' || m.source_shard || '_' || v_account.currency;
        insert into accounts (id, slot, kind, owner_client, currency)
        values (v_transit, m.slot_lo, 'transit', 'txroute', v_account.currency) on conflict (id) do nothing;
        update accounts set balance = balance - b.balance, version = version + 1
        where id = v_transit returning balance into v_transit_balance;
        update accounts set balance = b.balance, version = version + 1 where id = b.id;
        v_id := 'mvi_' || substr(p_move, 4) || '_' || b.id;
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state)
        values (v_id, 'txroute', 'move',
                case when b.balance > 0 then v_transit else b.id end,
                case when b.balance > 0 then b.id else v_transit end,
                abs(b.balance), v_account.currency, p_move, 'posted');
        insert into entries (transfer_id, account_id, amount, balance_after)
        values (v_id, v_transit, -b.balance, v_transit_balance), (v_id, b.id, b.balance, b.balance);
    end loop;
    perform txr_slot_split(m.slot_lo, m.slot_hi);
    delete from slot_ownership where slot_lo between m.slot_lo and m.slot_hi;
    insert into slot_ownership (slot_lo, slot_hi, epoch, state) values (m.slot_lo, m.slot_hi, m.epoch, 'owned');
    update slot_moves set balances = p_balances where id = p_move;
    perform txr_move_phase(p_move, 'switched');
    return jsonb_build_object('ok', true);
end $$;

-- Switch, last step (source): the range is `moved`, naming its owner, with the new epoch. Idempotent.
create function txr_move_switch_done(p_move text) returns void language plpgsql as $$
declare
    m slot_moves;
begin
    select * into strict m from slot_moves where id = p_move and role = 'source' for update;
    if m.phase in ('switched', 'done') then
        return;
    end if;
    assert m.phase = 'switching', m.phase;
    update slot_ownership set state = 'moved', epoch = m.epoch, owner_shard = m.target_shard,
                              owner_region = m.target_region, move_id = p_move
    where slot_lo between m.slot_lo and m.slot_hi;
    delete from slot_move_changes where move_id = p_move;
    perform txr_move_phase(p_move, 'switched');
end $$;

-- A saga message whose credit slot moved is re-addressed to the owner its old shard named (421), so the relay's
-- later attempts (and its per-region fairness) go there. Its transit accounting stays per transfer id: the
-- source's transit account keeps its name (towards the shard first addressed), the new owner books against
-- trn_<new owner>_<source>, and the audit sums a transfer's transit entries over every shard.
create function txr_outbox_readdress(p_transfer_id text, p_shard text, p_region text) returns void
language plpgsql as $$
begin
    update outbox
    set destination_shard = p_shard, destination_region = p_region,
        message = message || jsonb_build_object('destination_shard', p_shard)
    where transfer_id = p_transfer_id and delivered_at is null;
end $$;
