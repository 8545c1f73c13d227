DROP TRIGGER api_tokens_wake ON api_tokens;
DROP TRIGGER schedules_wake ON schedules;
DROP TRIGGER campaigns_wake ON campaigns;
DROP TRIGGER tasks_state_wake ON tasks;
DROP TRIGGER tasks_inserted_wake ON tasks;
DROP FUNCTION flywheel_wake();
ALTER TABLE workers DROP COLUMN controller_id;
DROP TABLE controllers;
