-- VMA enrollment: pairing codes, enrollments (key, proof of possession, the administrator's decision) and the
-- sshd sessions that logged in with an approved key (so that a revocation can end them).

CREATE TABLE vma_pairing_codes (
    id             TEXT PRIMARY KEY,                 -- pc-<12 hex>
    code_digest    TEXT NOT NULL UNIQUE,             -- sha256 of the normalised code; the code is shown once
    created_by     TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    expires_at     TEXT NOT NULL,
    used_at        TEXT,
    enrollment_id  TEXT                              -- the enrollment that used it (single use)
);

CREATE TABLE vma_enrollments (
    id                   TEXT PRIMARY KEY,           -- enr-<32 hex>
    pairing_code_id      TEXT NOT NULL REFERENCES vma_pairing_codes(id),
    public_key           TEXT NOT NULL,              -- "ssh-ed25519 AAAA... comment", normalised
    key_fingerprint      TEXT NOT NULL,              -- SHA256:<base64>, as sshd's %f prints it
    vma_name             TEXT NOT NULL,
    vma_version          TEXT NOT NULL DEFAULT '',
    vma_fingerprint      TEXT NOT NULL DEFAULT '',
    source               TEXT NOT NULL DEFAULT '',   -- address the enrollment came from
    challenge            TEXT NOT NULL,              -- 64 hex characters
    challenge_expires_at TEXT NOT NULL,
    challenge_used_at    TEXT,                       -- single use: set by the first verification attempt
    status               TEXT NOT NULL CHECK (status IN ('pending_verification', 'awaiting_approval', 'approved',
                                                         'rejected', 'expired', 'revoked')),
    created_at           TEXT NOT NULL,
    verified_at          TEXT,
    expires_at           TEXT NOT NULL,              -- an enrollment not approved by then expires
    decided_by           TEXT,
    decided_at           TEXT,
    notes                TEXT NOT NULL DEFAULT '',
    reason               TEXT NOT NULL DEFAULT '',
    revoked_by           TEXT,
    revoked_at           TEXT
);
CREATE INDEX vma_enrollments_status ON vma_enrollments(status);
-- One approved enrollment per key: sshd matches keys, not enrollments.
CREATE UNIQUE INDEX vma_enrollments_approved_key ON vma_enrollments(key_fingerprint) WHERE status = 'approved';

-- sshd's AuthorizedKeysCommand (omactl vma authorized-keys) records the per-connection sshd process (its
-- parent, sshd's privileged monitor for that connection) each time it hands out an approved key.
CREATE TABLE vma_tunnel_logins (
    monitor_pid     INTEGER NOT NULL,
    monitor_start   REAL NOT NULL,                   -- psutil create_time(): a reused pid is told apart
    enrollment_id   TEXT NOT NULL REFERENCES vma_enrollments(id) ON DELETE CASCADE,
    key_fingerprint TEXT NOT NULL,
    at              TEXT NOT NULL,
    PRIMARY KEY (monitor_pid, monitor_start, enrollment_id)
);
CREATE INDEX vma_tunnel_logins_enrollment ON vma_tunnel_logins(enrollment_id);
