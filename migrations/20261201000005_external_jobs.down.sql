ALTER TABLE attempts DROP COLUMN external_job;
