-- Deletes reach a slot move's target (issue 11). The change log (migration 0008) recorded inserts and updates
-- only, so a row deleted on the source while its range was copied stayed on the target: a webhook endpoint its
-- client deleted came back after the move, and went on receiving the client's events. The tables whose rows
-- are deleted in normal operation (app/store/slotdata.py, `deletes_logged`) now log deletes as well, and the
-- catch-up deletes on the target each logged row the source no longer has.

create or replace function txr_move_log() returns trigger language plpgsql as $$
declare
    v_row jsonb := case when tg_op = 'DELETE' then to_jsonb(old) else to_jsonb(new) end;
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

drop trigger webhook_endpoints_move_log on webhook_endpoints;
create trigger webhook_endpoints_move_log after insert or update or delete on webhook_endpoints
    for each row execute function txr_move_log('column', 'slot', 'id');
drop trigger webhook_deliveries_move_log on webhook_deliveries;
create trigger webhook_deliveries_move_log after insert or update or delete on webhook_deliveries
    for each row execute function txr_move_log('column', 'slot', 'endpoint_id', 'event_id');
drop trigger webhook_attempts_move_log on webhook_attempts;
create trigger webhook_attempts_move_log after insert or update or delete on webhook_attempts
    for each row execute function txr_move_log('column', 'slot', 'id');
