-- Worker registrations are bound to the token that made them: only that token may report for
-- the worker, and another token cannot take its id over.
ALTER TABLE workers ADD COLUMN token_id uuid REFERENCES api_tokens (id);

-- A client-supplied id makes CreateCampaign idempotent: a retried request returns the campaign
-- the first one created.
ALTER TABLE campaigns ADD COLUMN request_id text;
CREATE UNIQUE INDEX campaigns_request_id ON campaigns (request_id) WHERE request_id IS NOT NULL;
