-- Controller processes and when each last said it was alive (one row each, refreshed once a
-- lease period): a worker is online while its stream to a live controller is open, so worker
-- liveness is kept in the controllers' memory and written only when it changes.
CREATE TABLE controllers (
    id           uuid PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE workers ADD COLUMN controller_id uuid;

-- Wake-ups instead of polling: a change another controller must act on (a task's state, a
-- campaign's status, a schedule) notifies channel flywheel_wake with the writer's
-- application_name (each controller's own) and the table, so controllers skip their own.
CREATE FUNCTION flywheel_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flywheel_wake', current_setting('application_name') || ' ' || TG_TABLE_NAME);
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_inserted_wake AFTER INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION flywheel_wake();
CREATE TRIGGER tasks_state_wake AFTER UPDATE OF state ON tasks
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION flywheel_wake();
CREATE TRIGGER campaigns_wake AFTER INSERT OR UPDATE OF status ON campaigns
    FOR EACH ROW EXECUTE FUNCTION flywheel_wake();
CREATE TRIGGER schedules_wake AFTER INSERT OR UPDATE OR DELETE ON schedules
    FOR EACH ROW EXECUTE FUNCTION flywheel_wake();
-- A revoked token: controllers drop their cached checks at once.
CREATE TRIGGER api_tokens_wake AFTER UPDATE OR DELETE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION flywheel_wake();
