-- The job engine: named steps per job, a details document, and the time of the last change.

ALTER TABLE jobs ADD COLUMN updated_at TEXT;
ALTER TABLE jobs ADD COLUMN details TEXT NOT NULL DEFAULT '{}';

CREATE TABLE job_steps (
    job_id        TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    name          TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    started_at    TEXT NOT NULL,
    completed_at  TEXT,
    error_message TEXT,
    PRIMARY KEY (job_id, seq)
);
