-- CloudStack (OSSEA): saved connections with the ids replication and failover use, and per-VM network
-- mappings (a source VMware network → a CloudStack network, one for live and one for test failover).

CREATE TABLE ossea_configs (
    id                  INTEGER PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE,
    api_url             TEXT NOT NULL,              -- http(s)://host[:port]/client/api
    api_key             TEXT NOT NULL,
    secret_key_sealed   TEXT NOT NULL,              -- SecretBox text (omad/crypto.py), never the secret
    domain              TEXT NOT NULL DEFAULT '',
    zone                TEXT NOT NULL DEFAULT '',   -- CloudStack ids from here on
    oma_vm_id           TEXT NOT NULL DEFAULT '',   -- this appliance's VM: volumes are attached to it
    template_id         TEXT NOT NULL DEFAULT '',
    network_id          TEXT NOT NULL DEFAULT '',
    service_offering_id TEXT NOT NULL DEFAULT '',
    disk_offering_id    TEXT NOT NULL DEFAULT '',
    is_default          INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
    created_by          TEXT NOT NULL DEFAULT '',
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
-- At most one default: the config new VM contexts get (vm_replication_contexts.ossea_config_id).
CREATE UNIQUE INDEX ossea_configs_default ON ossea_configs(is_default) WHERE is_default = 1;
CREATE INDEX vm_contexts_ossea_config ON vm_replication_contexts(ossea_config_id);

CREATE TABLE network_mappings (
    id                       INTEGER PRIMARY KEY,
    vm_context_id            TEXT NOT NULL REFERENCES vm_replication_contexts(context_id) ON DELETE CASCADE,
    vm_id                    TEXT NOT NULL,         -- the VM's name (what clients address mappings by)
    source_network_name      TEXT NOT NULL,         -- the VMware network of one of the VM's NICs
    destination_network_id   TEXT NOT NULL,         -- a CloudStack network id, checked when saved
    destination_network_name TEXT NOT NULL DEFAULT '',
    is_test_network          INTEGER NOT NULL DEFAULT 0 CHECK (is_test_network IN (0, 1)),
    created_by               TEXT NOT NULL DEFAULT '',
    created_at               TEXT NOT NULL,
    updated_at               TEXT NOT NULL,
    UNIQUE (vm_context_id, source_network_name, is_test_network)
);
CREATE INDEX network_mappings_vm ON network_mappings(vm_id);
