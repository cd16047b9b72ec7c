-- Relay throughput (issue 14, item 5): the relay delivers saga messages to a credit shard in batches, applied
-- there in one transaction and settled on the debit shard in one transaction, each message with a result of
-- its own.
--
-- The common case is done set-based, a few statements for the whole batch: on the credit side a message that
-- is new (not in the inbox, no transfer of its id here, first of its id in the batch), for a slot owned here,
-- to an open account of its client and currency that stays under 2^53-1 with all of the batch's credits; on
-- the debit side an `applied` answer for a transfer still pending. It writes what the one-message function
-- would (the same rows, entries in message order with their running balances, versions counted per message,
-- the same triggers per row). Every other message runs the one-message function (txr_saga_apply as 0015 left
-- it, txr_saga_settle as 0009 left it) after the bulk, in order, so their behaviours stay theirs alone to
-- define: duplicates read the inbox, refusals (closed account, unknown account, wrong currency, the balance
-- limit), 421 naming the owner of a moved slot or 503 while it moves, a captured hold's archived row taken
-- over, returns to any account (a closed one too).
--
-- The locks are taken up front, in one ordered pass per kind, so two batches (or a batch and a single
-- delivery or a posting) never wait on each other in a cycle:
--     credit side   the messages' advisory locks, by lock key; then their credit and transit accounts, by id
--     debit side    the transfer rows, by id; then the accounts a return books, by id
-- A message whose function raises (a bug, a broken constraint) aborts its batch: the caller splits the batch
-- and calls again until that message is alone (app/region/saga.py), as the posting group commit does.

-- Applies many messages addressed to this shard; returns one result per message, in order (see txr_saga_apply).
-- A message debited on this very shard (its credit slot moved here) is not for this function: the relay sends
-- it alone to txr_saga_apply_own.
create function txr_saga_apply_batch(p_messages jsonb) returns jsonb language plpgsql as $$
declare
    v_shard text;
    v_bulk bigint[];
    v_rows jsonb;
    v_results jsonb := '[]'::jsonb;
    v_message jsonb;
    v_n bigint;
begin
    assert jsonb_typeof(p_messages) = 'array', 'a batch is an array of messages';
    select shard into strict v_shard from shard_info;
    -- Once-only per message (txr_saga_apply takes the same lock again: it is the session's already).
    perform pg_advisory_xact_lock(k)
    from (select distinct hashtextextended(m ->> 'transfer_id', 11) as k
          from jsonb_array_elements(p_messages) m order by 1) keys;
    -- The transit accounts exist before any account is locked (as txr_saga_apply would create them).
    insert into accounts (id, slot, kind, owner_client, currency)
    select distinct on (t.id) t.id, t.slot, 'transit', 'txroute', t.currency
    from (select 'trn_' || v_shard || '_' || (m ->> 'source_shard') || '_' || (m ->> 'currency') as id,
                 (m ->> 'credit_slot')::integer as slot, m ->> 'currency' as currency
          from jsonb_array_elements(p_messages) m
          where txr_owns((m ->> 'credit_slot')::integer)) t
    order by t.id
    on conflict (id) do nothing;
    perform 1 from accounts
    where id in (select m ->> 'credit_account' from jsonb_array_elements(p_messages) m
                 union
                 select 'trn_' || v_shard || '_' || (m ->> 'source_shard') || '_' || (m ->> 'currency')
                 from jsonb_array_elements(p_messages) m)
    order by id
    for update;

    -- The messages applied in bulk (the header says which); the rest go one by one below.
    select coalesce(array_agg(x.n), '{}') into v_bulk
    from (select e.m, e.n, row_number() over (partition by e.m ->> 'transfer_id' order by e.n) as occurrence
          from jsonb_array_elements(p_messages) with ordinality e(m, n)) x
    join accounts c on c.id = x.m ->> 'credit_account'
    where x.occurrence = 1
      and txr_owns((x.m ->> 'credit_slot')::integer)
      and not exists (select 1 from inbox i where i.transfer_id = x.m ->> 'transfer_id')
      and not exists (select 1 from transfers t where t.id = x.m ->> 'transfer_id')
      and txr_customer_refusal(c, x.m ->> 'credit_account', x.m ->> 'client', x.m ->> 'currency') is null;
    select coalesce(array_agg(y.n), '{}') into v_bulk
    from (select e.n, c.balance + sum((e.m ->> 'amount')::bigint) over (partition by c.id) as total
          from jsonb_array_elements(p_messages) with ordinality e(m, n)
          join accounts c on c.id = e.m ->> 'credit_account'
          where e.n = any(v_bulk)) y
    where y.total <= 9007199254740991;
    select jsonb_agg(e.m || jsonb_build_object(
                         'n', e.n,
                         'transit', 'trn_' || v_shard || '_' || (e.m ->> 'source_shard') || '_' || (e.m ->> 'currency'))
                     order by e.n)
    into v_rows
    from jsonb_array_elements(p_messages) with ordinality e(m, n)
    where e.n = any(v_bulk);

    if v_rows is not null then
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state,
                               debit_shard, credit_shard)
        select b.transfer_id, b.client, 'transfer', b.debit_account, b.credit_account, b.amount, b.currency,
               b.reference, 'posted', b.source_shard, v_shard
        from jsonb_to_recordset(v_rows) as b(n bigint, transfer_id text, client text, debit_account text,
                                             credit_account text, amount bigint, currency text, reference text,
                                             source_shard text)
        order by b.n;
        -- Per message, as txr_saga_apply writes them: the transit's entry, then the credit's, each with the
        -- balance its account has after it (balances before the batch plus the running sum, in message order).
        insert into entries (transfer_id, account_id, amount, balance_after)
        select x.transfer_id, x.account_id, x.amount, x.balance_after
        from (select b.n, 0 as k, b.transfer_id, b.transit as account_id, -b.amount as amount,
                     t.balance - sum(b.amount) over (partition by b.transit order by b.n) as balance_after
              from jsonb_to_recordset(v_rows) as b(n bigint, transfer_id text, transit text, amount bigint)
              join accounts t on t.id = b.transit
              union all
              select b.n, 1, b.transfer_id, b.credit_account, b.amount,
                     c.balance + sum(b.amount) over (partition by b.credit_account order by b.n)
              from jsonb_to_recordset(v_rows) as b(n bigint, transfer_id text, credit_account text, amount bigint)
              join accounts c on c.id = b.credit_account) x
        order by x.n, x.k;
        update accounts a set balance = a.balance + s.amount, version = a.version + s.messages
        from (select b.credit_account as id, sum(b.amount) as amount, count(*) as messages
              from jsonb_to_recordset(v_rows) as b(credit_account text, amount bigint) group by b.credit_account
              union all
              select b.transit, -sum(b.amount), count(*)
              from jsonb_to_recordset(v_rows) as b(transit text, amount bigint) group by b.transit) s
        where a.id = s.id;
        insert into inbox (transfer_id, source_shard, outcome, credit_account, amount, currency)
        select b.transfer_id, b.source_shard, 'applied', b.credit_account, b.amount, b.currency
        from jsonb_to_recordset(v_rows) as b(n bigint, transfer_id text, source_shard text, credit_account text,
                                             amount bigint, currency text)
        order by b.n;
    end if;

    for v_message, v_n in select e.m, e.n from jsonb_array_elements(p_messages) with ordinality e(m, n) order by e.n loop
        if v_n = any(v_bulk) then
            v_results := v_results || jsonb_build_array(jsonb_build_object('outcome', 'applied'));
        else
            v_results := v_results || jsonb_build_array(txr_saga_apply(v_message));
        end if;
    end loop;
    return v_results;
end $$;

-- Settles many sagas debited on this shard: p_answers is an array of {"transfer_id", "outcome", "reason"};
-- returns each transfer's body, in order (see txr_saga_settle).
create function txr_saga_settle_batch(p_answers jsonb) returns jsonb language plpgsql as $$
declare
    v_posted text[];
    v_results jsonb := '[]'::jsonb;
    v_answer jsonb;
begin
    assert jsonb_typeof(p_answers) = 'array', 'a batch is an array of answers';
    perform 1 from transfers
    where id in (select a ->> 'transfer_id' from jsonb_array_elements(p_answers) a)
    order by id
    for update;
    -- A return books the debit account and the transit account (only for transfers still pending).
    perform 1 from accounts
    where id in (select x.id
                 from transfers t
                 join jsonb_array_elements(p_answers) a on a ->> 'transfer_id' = t.id
                 cross join lateral (values (t.debit_account),
                                            ('trn_' || t.debit_shard || '_' || t.credit_shard || '_' || t.currency)) x(id)
                 where t.state = 'pending' and a ->> 'outcome' = 'refused')
    order by id
    for update;
    -- `applied` to a transfer still pending, in bulk: what txr_saga_settle's `applied` branch writes.
    with posted as (
        update transfers t set state = 'posted'
        where t.state = 'pending'
          and t.id in (select a ->> 'transfer_id' from jsonb_array_elements(p_answers) a
                       where a ->> 'outcome' = 'applied')
        returning t.id)
    select coalesce(array_agg(id order by id), '{}') into v_posted from posted;
    if cardinality(v_posted) > 0 then
        insert into transfer_events (transfer_id, seq, state, reason)
        select t.id, coalesce((select max(e.seq) from transfer_events e where e.transfer_id = t.id), 0) + 1,
               t.state, t.reason
        from transfers t where t.id = any(v_posted);
        update outbox set delivered_at = clock_timestamp() where transfer_id = any(v_posted);
        update idempotency i set status_code = 201, body = txr_transfer_body(t)
        from transfers t
        where t.id = any(v_posted) and i.client = t.client and i.key in (t.idempotency_key, t.resolution_key);
    end if;
    -- Every answer's body; the others (refused, settled already) settle one by one (a posted one only reads).
    for v_answer in select value from jsonb_array_elements(p_answers) loop
        v_results := v_results || jsonb_build_array(
            txr_saga_settle(v_answer ->> 'transfer_id', v_answer ->> 'outcome', v_answer ->> 'reason'));
    end loop;
    return v_results;
end $$;
