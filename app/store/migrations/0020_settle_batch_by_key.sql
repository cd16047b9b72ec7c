-- The relay's batch settlement (migration 0017) updated the stored answers of the posted sagas with a join on
-- `key in (idempotency_key, resolution_key)`, which PostgreSQL runs as a hash join on the client alone and a
-- filter: 246 ms for 200 sagas of a client with 1,200 stored answers, growing with the client's stored answers.
-- Each key is now its own row, so every stored answer is found by its primary key (client, key).
create or replace function txr_saga_settle_batch(p_answers jsonb) returns jsonb language plpgsql as $$
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
        from transfers t cross join lateral (values (t.idempotency_key), (t.resolution_key)) k (key)
        where t.id = any(v_posted) and k.key is not null and i.client = t.client and i.key = k.key;
    end if;
    -- Every answer's body; the others (refused, settled already) settle one by one (a posted one only reads).
    for v_answer in select value from jsonb_array_elements(p_answers) loop
        v_results := v_results || jsonb_build_array(
            txr_saga_settle(v_answer ->> 'transfer_id', v_answer ->> 'outcome', v_answer ->> 'reason'));
    end loop;
    return v_results;
end $$;
