ALTER TABLE attempts RESET (fillfactor);
DROP INDEX tasks_unfinished_idle;
DROP INDEX tasks_running;
CREATE INDEX tasks_leases ON tasks (lease_expires_at) WHERE state = 'running';
CREATE INDEX tasks_unfinished ON tasks (round_id, stage) WHERE state <> 'succeeded';
CREATE INDEX tasks_campaign ON tasks (campaign_id, round_index);
