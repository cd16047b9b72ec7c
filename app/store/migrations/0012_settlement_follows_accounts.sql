-- A shard's settlement account for a currency exists whenever the shard holds a customer account in that
-- currency (issue 11). txr_open_account creates it when an account is opened; an account that arrives by a
-- slot move (the mover's copy into a shard that never opened one in that currency, e.g. a new shard taking
-- half of a hot one) came without it, and its first deposit failed the posting function's assertion that
-- system accounts exist (a 500). This trigger makes the rule hold for every way a customer account is
-- inserted, in the inserting transaction. The settlement account is a system account (kind 'settlement'),
-- which the mover never copies, verifies or drops (app/store/slotdata.py moves customer accounts only).
create function txr_settlement_follows() returns trigger language plpgsql as $$
begin
    insert into accounts (id, slot, kind, owner_client, currency)
    select 'set_' || shard || '_' || new.currency, new.slot, 'settlement', 'txroute', new.currency
    from shard_info
    on conflict (id) do nothing;
    return null;
end $$;

create trigger accounts_settlement_follows after insert on accounts
    for each row when (new.kind = 'customer') execute function txr_settlement_follows();
