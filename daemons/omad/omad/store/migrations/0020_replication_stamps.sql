-- Replication: the stamp the last completed sync wrote at the end of each volume (volume-agent's
-- GET/PUT /volumes/{id}/stamp). A volume that shows another stamp at the next sync was reverted or recreated
-- outside the appliance: its disk starts over with a full copy. NULL: no completed sync has stamped it.

ALTER TABLE replication_volumes ADD COLUMN sync_stamp TEXT;
