-- The ledger of one shard (DESIGN D2, D4, D5). Plain SQL; applied once, in order, recorded in
-- schema_migrations by app.store.migrate. The database holds the invariants as well as the code:
-- customer balances within their limit, positive amounts, zero-sum transfers, append-only entries.

create table shard_info (
    singleton boolean primary key default true check (singleton),
    shard text not null,
    region text not null,
    created_at timestamptz not null default now()
);

-- The slots this shard owns (DESIGN D2). Requests for any other slot are refused with 421.
create table slot_ownership (
    slot_lo integer primary key check (slot_lo between 0 and 4095),
    slot_hi integer not null check (slot_hi between slot_lo and 4095),
    epoch bigint not null check (epoch >= 1),
    state text not null check (state in ('owned', 'moving_out'))
);

create table accounts (
    id text primary key,
    slot integer not null check (slot between 0 and 4095),
    kind text not null check (kind in ('customer', 'settlement', 'transit')),
    owner_client text not null,
    currency text not null check (currency ~ '^[A-Z]{3}$'),
    balance bigint not null default 0,
    overdraft_limit bigint not null default 0 check (overdraft_limit between 0 and 9007199254740991),
    status text not null default 'open' check (status in ('open', 'closed')),
    version bigint not null default 0,
    created_at timestamptz not null default now(),
    -- A customer balance stays within [-overdraft_limit, 2^53-1] so every JSON client reads it exactly.
    constraint customer_balance_within_limit check (
        kind <> 'customer' or balance between -overdraft_limit and 9007199254740991
    )
);

-- Transfer states and the transitions allowed between them: one table, enforced by one trigger for every
-- writer (DESIGN: states are enums with transitions checked in one place; app.ledger.states mirrors it).
create table transfer_states (state text primary key, terminal boolean not null);
insert into transfer_states values ('pending', false), ('posted', true), ('returned', true);
create table transfer_transitions (
    from_state text not null references transfer_states (state),
    to_state text not null references transfer_states (state),
    primary key (from_state, to_state)
);
insert into transfer_transitions values ('pending', 'posted'), ('pending', 'returned');

-- A transfer as its client sees it. Its accounts may live in another shard (a saga, DESIGN D6), so they are
-- not foreign keys here; the entries, which are this shard's own money, reference real accounts.
create table transfers (
    id text primary key,
    client text not null,
    kind text not null check (kind in ('transfer', 'deposit', 'withdrawal')),
    debit_account text not null,
    credit_account text not null,
    amount bigint not null check (amount between 1 and 9007199254740991),
    currency text not null check (currency ~ '^[A-Z]{3}$'),
    reference text,
    state text not null references transfer_states (state),
    reason text,
    -- Set on cross-shard transfers: the shards of each side, and the key whose stored response follows the
    -- transfer to its terminal state.
    debit_shard text,
    credit_shard text,
    idempotency_key text,
    created_at timestamptz not null default now(),
    check (debit_account <> credit_account),
    check ((state = 'returned') = (reason is not null))
);
create index transfers_pending on transfers (credit_shard) where state = 'pending';

create function transfers_check_transition() returns trigger language plpgsql as $$
begin
    if new.state is distinct from old.state and not exists (
        select 1 from transfer_transitions where from_state = old.state and to_state = new.state
    ) then
        raise exception 'transfer % cannot go from % to %', old.id, old.state, new.state
            using errcode = 'check_violation';
    end if;
    if (new.id, new.client, new.kind, new.debit_account, new.credit_account, new.amount, new.currency)
        is distinct from
       (old.id, old.client, old.kind, old.debit_account, old.credit_account, old.amount, old.currency) then
        raise exception 'transfer % is immutable but for its state', old.id using errcode = 'check_violation';
    end if;
    return new;
end $$;
create trigger transfers_check_transition before update on transfers
    for each row execute function transfers_check_transition();

-- Each transfer's history of states, for GET /v1/transfers/{id}.
create table transfer_events (
    transfer_id text not null references transfers (id),
    seq integer not null,
    state text not null references transfer_states (state),
    reason text,
    at timestamptz not null default clock_timestamp(),
    primary key (transfer_id, seq)
);

-- Saga messages to other shards (DESIGN D6): written in the same transaction as the debit, delivered at
-- least once by the relay (app.region.relay), marked delivered when the destination's answer is settled.
create table outbox (
    transfer_id text primary key references transfers (id),
    destination_shard text not null,
    destination_region text not null,
    message jsonb not null,
    attempts integer not null default 0 check (attempts >= 0),
    next_attempt_at timestamptz not null,
    last_error text,
    created_at timestamptz not null default now(),
    delivered_at timestamptz
);
create index outbox_due on outbox (next_attempt_at) where delivered_at is null;

-- Saga messages received from other shards, applied once each: a duplicate delivery reads its outcome here.
create table inbox (
    transfer_id text primary key,
    source_shard text not null,
    outcome text not null check (outcome in ('applied', 'refused')),
    reason text,
    credit_account text not null,
    amount bigint not null check (amount > 0),
    currency text not null,
    received_at timestamptz not null default now()
);

-- Journal entries: signed amounts, positive credits the account. Append-only.
create table entries (
    id bigserial primary key,
    transfer_id text not null references transfers (id),
    account_id text not null references accounts (id),
    amount bigint not null check (amount <> 0),
    balance_after bigint not null,
    created_at timestamptz not null default now()
);
create index entries_account on entries (account_id, id desc);
create index entries_transfer on entries (transfer_id);

create function entries_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'entries are append-only (% on entry %)', tg_op, old.id
        using errcode = 'restrict_violation';
end $$;
create trigger entries_append_only before update or delete on entries
    for each row execute function entries_append_only();
create trigger entries_no_truncate before truncate on entries
    for each statement execute function entries_append_only();

-- Each transfer's entries sum to zero, checked at commit (after all its entries are written).
create function entries_zero_sum() returns trigger language plpgsql as $$
declare
    total numeric;
begin
    select sum(amount) into total from entries where transfer_id = new.transfer_id;
    if total <> 0 then
        raise exception 'entries of transfer % sum to %, not zero', new.transfer_id, total
            using errcode = 'check_violation';
    end if;
    return null;
end $$;
create constraint trigger entries_zero_sum after insert on entries
    deferrable initially deferred for each row execute function entries_zero_sum();

-- Idempotency (DESIGN D5): the stored response of every write, in the same transaction as its effect.
create table idempotency (
    client text not null,
    key text not null,
    fingerprint text not null,
    status_code integer not null check (status_code between 200 and 499),
    body jsonb not null,
    created_at timestamptz not null default now(),
    primary key (client, key)
);
