-- Attempts are written only by the statement that claims their task (from the row it just
-- updated), so each names an existing task. The foreign key checked that again on every
-- insert, taking a share lock on a task row its own statement had just locked for update
-- (a multixact per claimed task, about half of a claim's time). Deleting tasks still deletes
-- their attempts, by this trigger instead of the key's cascade.
ALTER TABLE attempts DROP CONSTRAINT attempts_task_id_fkey;
CREATE FUNCTION attempts_of_deleted_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM attempts a USING deleted d WHERE a.task_id = d.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_deleted_attempts AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION attempts_of_deleted_tasks();

-- Wake-ups for task changes fire once per statement instead of once per row: a claim or a
-- settled batch of hundreds of tasks called the notifying function for each of them.
DROP TRIGGER tasks_inserted_wake ON tasks;
DROP TRIGGER tasks_state_wake ON tasks;
CREATE FUNCTION flywheel_wake_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed boolean;
BEGIN
    -- Separate statements: an INSERT trigger has no old_rows to plan against.
    IF TG_OP = 'INSERT' THEN
        changed := EXISTS (SELECT 1 FROM new_rows);
    ELSE
        changed := EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o ON o.id = n.id
                           WHERE o.state IS DISTINCT FROM n.state);
    END IF;
    IF changed THEN
        PERFORM pg_notify('flywheel_wake', current_setting('application_name') || ' tasks');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_inserted_wake AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION flywheel_wake_tasks();
CREATE TRIGGER tasks_state_wake AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION flywheel_wake_tasks();
