-- The change log of slot moves (txr_move_log, migration 0036) answers first whether this shard has a move that
-- logs at all (issue 14).
--
-- The trigger fires after every insert, update and delete of a per-slot table: a posting fires it about five
-- times, a saga's apply and settle about three times each. It turned the whole row into jsonb (to_jsonb) and
-- read the row's slot out of it before it looked for a move covering that slot; nearly always there is none.
-- Measured on a shard of the saga benchmark (1,895 transfers, one statement updating them all, loaded 2-core
-- machine, medians of 6): ~0.075 ms per row with the trigger as it was, ~0.013 ms with the check below first
-- (~0.05 ms without the trigger). The check is the old lookup without its slot range (and without the target's
-- `txr.move_copy` exemption), so when it finds no move the old lookup could not have found one either: the
-- trigger returns, as before, having logged nothing. With a move that logs, everything runs as before. Both read
-- slot_moves with the statement's snapshot, as before.
create or replace function txr_move_log() returns trigger language plpgsql as $$
declare
    v_row jsonb;
    v_slot integer;
    v_move text;
begin
    if current_setting('txr.move_switch', true) = 'on' then
        return null;
    end if;
    if not exists (select 1 from slot_moves
                   where role = 'source' and phase in ('copying', 'catching_up', 'frozen')
                      or role = 'target' and phase = 'copying') then
        return null;
    end if;
    v_row := case when tg_op = 'DELETE' then to_jsonb(old) else to_jsonb(new) end;
    v_slot := case tg_argv[0]
        when 'id' then txr_id_slot(v_row ->> tg_argv[1])
        else (v_row ->> tg_argv[1])::integer end;
    if v_slot is null then
        return null;
    end if;
    select id into v_move from slot_moves
    where v_slot between slot_lo and slot_hi
      and (role = 'source' and phase in ('copying', 'catching_up', 'frozen')
           or role = 'target' and phase = 'copying' and current_setting('txr.move_copy', true) is distinct from 'on')
    limit 1;
    if v_move is null then
        return null;
    end if;
    insert into slot_move_changes (move_id, tbl, key)
    select v_move, tg_table_name, jsonb_object_agg(k, v_row -> k) from unnest(tg_argv[2:tg_nargs - 1]) k;
    if tg_op = 'UPDATE' then  -- an update of the key itself: the old key's row is gone
        insert into slot_move_changes (move_id, tbl, key)
        select v_move, tg_table_name, o.key
        from (select jsonb_object_agg(k, to_jsonb(old) -> k) as key from unnest(tg_argv[2:tg_nargs - 1]) k) o
        where o.key is distinct from (select jsonb_object_agg(k, v_row -> k) from unnest(tg_argv[2:tg_nargs - 1]) k);
    end if;
    return null;
end $$;

-- The relay's batch settlement (migrations 0017, 0020, 0023) built each posted transfer's body twice: once for
-- its stored answers, once for the batch's answer. It is built once now and used for both (the transfer's row
-- does not change in between). Everything else is migration 0023's text.
create or replace function txr_saga_settle_batch(p_answers jsonb) returns jsonb language plpgsql as $$
declare
    v_posted text[];
    v_bodies jsonb := '{}';
    v_results jsonb[];
    v_answer jsonb;
    v_n integer;
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
        select jsonb_object_agg(t.id, txr_transfer_body(t)) into v_bodies from transfers t where t.id = any(v_posted);
        update idempotency i set status_code = 201, body = v_bodies -> t.id
        from transfers t cross join lateral (values (t.idempotency_key), (t.resolution_key)) k (key)
        where t.id = any(v_posted) and k.key is not null and i.client = t.client and i.key = k.key;
    end if;
    -- Every answer's body: a transfer no longer pending answers it here (what txr_saga_settle returns for it);
    -- one still pending (a refusal to return) settles one by one, in order. An unknown transfer is left to
    -- txr_saga_settle, whose assertion fails the batch as before.
    select array_agg(case when t.state <> 'pending' then coalesce(v_bodies -> t.id, txr_transfer_body(t)) end
                     order by a.n)
    into v_results
    from jsonb_array_elements(p_answers) with ordinality a (x, n)
    left join transfers t on t.id = a.x ->> 'transfer_id';
    for v_answer, v_n in select a.x, a.n from jsonb_array_elements(p_answers) with ordinality a (x, n) loop
        if v_results[v_n] is null then
            v_results[v_n] := txr_saga_settle(v_answer ->> 'transfer_id', v_answer ->> 'outcome', v_answer ->> 'reason');
        end if;
    end loop;
    return coalesce(to_jsonb(v_results), '[]'::jsonb);
end $$;
