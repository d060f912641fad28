-- Which VM contexts each change of the VM list touched, so omad re-renders only those items of its rendered
-- list instead of all 10,000 (omad/inventory/contexts.py). The triggers of migration 0002 keep bumping the
-- generation and now also record, per context, the generation of its last change. A deleted context keeps
-- its row: that row is how the list learns it is gone.

CREATE TABLE vm_context_changes (
    context_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
);
CREATE INDEX vm_context_changes_generation ON vm_context_changes(generation);

DROP TRIGGER vm_contexts_changed_insert;
CREATE TRIGGER vm_contexts_changed_insert AFTER INSERT ON vm_replication_contexts BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
    REPLACE INTO vm_context_changes (context_id, generation)
        VALUES (NEW.context_id, (SELECT generation FROM change_counters WHERE name = 'vm_contexts'));
END;

DROP TRIGGER vm_contexts_changed_update;
CREATE TRIGGER vm_contexts_changed_update AFTER UPDATE ON vm_replication_contexts BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
    REPLACE INTO vm_context_changes (context_id, generation)
        SELECT id, (SELECT generation FROM change_counters WHERE name = 'vm_contexts')
        FROM (SELECT NEW.context_id AS id UNION SELECT OLD.context_id);
END;

DROP TRIGGER vm_contexts_changed_delete;
CREATE TRIGGER vm_contexts_changed_delete AFTER DELETE ON vm_replication_contexts BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
    REPLACE INTO vm_context_changes (context_id, generation)
        VALUES (OLD.context_id, (SELECT generation FROM change_counters WHERE name = 'vm_contexts'));
END;

DROP TRIGGER vm_memberships_changed_insert;
CREATE TRIGGER vm_memberships_changed_insert AFTER INSERT ON vm_group_memberships BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
    REPLACE INTO vm_context_changes (context_id, generation)
        VALUES (NEW.vm_context_id, (SELECT generation FROM change_counters WHERE name = 'vm_contexts'));
END;

DROP TRIGGER vm_memberships_changed_update;
CREATE TRIGGER vm_memberships_changed_update AFTER UPDATE ON vm_group_memberships BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
    REPLACE INTO vm_context_changes (context_id, generation)
        SELECT id, (SELECT generation FROM change_counters WHERE name = 'vm_contexts')
        FROM (SELECT NEW.vm_context_id AS id UNION SELECT OLD.vm_context_id);
END;

DROP TRIGGER vm_memberships_changed_delete;
CREATE TRIGGER vm_memberships_changed_delete AFTER DELETE ON vm_group_memberships BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
    REPLACE INTO vm_context_changes (context_id, generation)
        VALUES (OLD.vm_context_id, (SELECT generation FROM change_counters WHERE name = 'vm_contexts'));
END;

-- A group's name and id show in its members' items.
DROP TRIGGER vm_groups_changed_update;
CREATE TRIGGER vm_groups_changed_update AFTER UPDATE ON vm_machine_groups BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
    REPLACE INTO vm_context_changes (context_id, generation)
        SELECT vm_context_id, (SELECT generation FROM change_counters WHERE name = 'vm_contexts')
        FROM vm_group_memberships WHERE group_id IN (NEW.id, OLD.id);
END;

-- Before the delete: its members are still there to be recorded (their cascaded deletes record them again,
-- but only where foreign keys are on; an operator's sqlite3 may have them off).
DROP TRIGGER vm_groups_changed_delete;
CREATE TRIGGER vm_groups_changed_delete BEFORE DELETE ON vm_machine_groups BEGIN
    UPDATE change_counters SET generation = generation + 1 WHERE name = 'vm_contexts';
    REPLACE INTO vm_context_changes (context_id, generation)
        SELECT vm_context_id, (SELECT generation FROM change_counters WHERE name = 'vm_contexts')
        FROM vm_group_memberships WHERE group_id = OLD.id;
END;
