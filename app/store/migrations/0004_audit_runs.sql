-- Each `txroute audit` records its result in every shard it read (app/ops/audit.py: record), so every region
-- exposes the last result as a metric (`txroute_last_audit_clean`) that an alert watches: the audit is a
-- command that exits, an alert needs a number that stays. Only the names of failed checks are kept, never
-- their detail (account ids and amounts belong in the audit's own output).
create table audit_runs (
    id bigint generated always as identity primary key,
    finished_at timestamptz not null default clock_timestamp(),
    clean boolean not null,
    violations integer not null check (violations >= 0),
    failed_checks text[] not null default '{}',
    check (clean = (violations = 0))
);
