-- Failover: a row per failover job (beside its `jobs` row) — a test or live failover, the end of a test, a
-- rollback — and a row per step, written before the step runs, with what the step produced in CloudStack or
-- on the VMA (ids), so an omad that died half-way resumes or compensates from the records alone.

CREATE TABLE failover_jobs (
    job_id              TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
    vm_context_id       TEXT NOT NULL REFERENCES vm_replication_contexts(context_id) ON DELETE CASCADE,
    vm_name             TEXT NOT NULL,
    failover_type       TEXT NOT NULL CHECK (failover_type IN ('test', 'live')),
    operation           TEXT NOT NULL CHECK (operation IN ('failover', 'end_test', 'rollback')),
    status              TEXT NOT NULL CHECK (status IN ('running', 'compensating', 'completed', 'failed',
                                                        'compensated', 'ended')),
    parent_job_id       TEXT,                        -- the failover an end test or rollback undoes
    options             TEXT NOT NULL DEFAULT '{}',  -- the request (JSON)
    error_message       TEXT,
    created_by          TEXT NOT NULL DEFAULT '',
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    completed_at        TEXT
);
-- One failover job at work per VM, whatever the code above it does.
CREATE UNIQUE INDEX failover_jobs_active ON failover_jobs(vm_context_id) WHERE status IN ('running', 'compensating');
CREATE INDEX failover_jobs_context ON failover_jobs(vm_context_id, created_at);

CREATE TABLE failover_steps (
    job_id          TEXT NOT NULL REFERENCES failover_jobs(job_id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,                -- the step's place in its job's plan
    name            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'compensating',
                                                    'compensated')),
    on_crash        TEXT NOT NULL CHECK (on_crash IN ('resume', 'compensate')),
    produced        TEXT NOT NULL DEFAULT '{}',      -- CloudStack / VMA ids the step made or found (JSON)
    error_message   TEXT,
    started_at      TEXT NOT NULL,
    completed_at    TEXT,
    compensated_at  TEXT,
    PRIMARY KEY (job_id, seq)
);
