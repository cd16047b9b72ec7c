-- Relay throughput (issue 14, item 5): the relay delivers saga messages to a credit shard in batches, applied
-- there in one transaction and settled on the debit shard in one transaction. Both batch functions run the
-- one-message functions of earlier migrations (txr_saga_apply as 0015 left it, txr_saga_settle as 0009 left
-- it) for each message, so every behaviour those have (the inbox's once-only apply, refusals such as a closed
-- account, 421 naming the owner of a moved slot, a captured hold's archived row, returns to any account) is
-- the batch's too, and each message gets its own result. Only the locks are taken up front, in one ordered
-- pass per kind, so two batches (or a batch and a single delivery or a posting) never wait on each other in
-- a cycle:
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
    v_results jsonb := '[]'::jsonb;
    v_message jsonb;
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
    for v_message in select value from jsonb_array_elements(p_messages) loop
        v_results := v_results || jsonb_build_array(txr_saga_apply(v_message));
    end loop;
    return v_results;
end $$;

-- Settles many sagas debited on this shard: p_answers is an array of {"transfer_id", "outcome", "reason"};
-- returns each transfer's body, in order (see txr_saga_settle).
create function txr_saga_settle_batch(p_answers jsonb) returns jsonb language plpgsql as $$
declare
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
    for v_answer in select value from jsonb_array_elements(p_answers) loop
        v_results := v_results || jsonb_build_array(
            txr_saga_settle(v_answer ->> 'transfer_id', v_answer ->> 'outcome', v_answer ->> 'reason'));
    end loop;
    return v_results;
end $$;
