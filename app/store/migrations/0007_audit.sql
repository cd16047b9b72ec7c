-- The audit's checkpoint (app/ops/audit.py): what a clean audit established about this shard's journal up
-- to an entry id, so the next run reads only the entries after it (checkpoint + delta) instead of summing
-- the whole history again. `txroute audit --full` ignores it and recomputes everything.
--
-- Why an entry id is a safe horizon: ids are drawn from a sequence, so an entry whose id is below that of a
-- committed entry X was drawn before X's was, by a transaction that started before X's drew it. The audit
-- takes as horizon the largest id among entries created at least twice the watermark margin before its
-- snapshot (margin >= the longest ledger transaction), so no entry at or below the horizon can still be
-- uncommitted: none can appear below it later (entries are append-only, entries_append_only).
create table audit_checkpoints (
    singleton boolean primary key default true check (singleton),
    entries_horizon_id bigint not null check (entries_horizon_id >= 0),
    taken_at timestamptz not null default clock_timestamp()
);

-- Per account, its journal up to the horizon: the balance it sums to (credits - debits), how many entries,
-- the last one's id (whose balance_after must still equal `balance`), and the totals each way (a settlement
-- account's debits are the deposits, its credits the withdrawals). No foreign key: the checkpoint describes
-- the journal, and an account row that vanished must be reported by the audit, not refused here.
create table audit_checkpoint_accounts (
    account_id text primary key,
    balance numeric not null,
    entries_count bigint not null check (entries_count >= 0),
    last_entry_id bigint,
    debits numeric not null check (debits >= 0),
    credits numeric not null check (credits >= 0),
    check (balance = credits - debits)
);

-- Sagas the last run could not judge yet (a step after its watermark) or that were not terminal: the next
-- incremental run checks them again even when they wrote no entry since (a `posted` settle writes none).
create table audit_deferred (
    transfer_id text primary key
);
