DROP INDEX campaigns_request_id;
ALTER TABLE campaigns DROP COLUMN request_id;
ALTER TABLE workers DROP COLUMN token_id;
