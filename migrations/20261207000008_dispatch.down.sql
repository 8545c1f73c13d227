DROP TRIGGER tasks_inserted_wake ON tasks;
DROP TRIGGER tasks_state_wake ON tasks;
DROP FUNCTION flywheel_wake_tasks();
CREATE TRIGGER tasks_inserted_wake AFTER INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION flywheel_wake();
CREATE TRIGGER tasks_state_wake AFTER UPDATE OF state ON tasks
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION flywheel_wake();
DROP TRIGGER tasks_deleted_attempts ON tasks;
DROP FUNCTION attempts_of_deleted_tasks();
DELETE FROM attempts a WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = a.task_id);
ALTER TABLE attempts ADD CONSTRAINT attempts_task_id_fkey
    FOREIGN KEY (task_id) REFERENCES tasks (id) ON DELETE CASCADE;
