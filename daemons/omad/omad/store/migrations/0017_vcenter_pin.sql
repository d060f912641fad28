-- vCenter certificates are checked by default: a credential may pin its vCenter's certificate (a self-signed
-- one) by its SHA-256 thumbprint, upper-case hex pairs joined by colons; '' = trust the CA store.

ALTER TABLE vmware_credentials ADD COLUMN tls_thumbprint TEXT NOT NULL DEFAULT '';
