-- The cluster job an attempt runs its work in (`slurm:<job id>`), recorded as soon as the
-- worker submitted or re-attached to it.
ALTER TABLE attempts ADD COLUMN external_job text;
