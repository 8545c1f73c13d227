-- Inference servers run by serve tasks: one row per attempt that became ready. A consumer is
-- released by the ready row of its serve task's current attempt; the row is `stopped` when
-- the serve task succeeds and `gone` when that attempt ends any other way.
CREATE TABLE endpoints (
    task_id      uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt      int  NOT NULL,
    campaign_id  uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    stage        text NOT NULL,
    url          text NOT NULL,
    served_name  text NOT NULL,
    -- The model artifact served and its content hash, as the server reported them.
    model_id     uuid REFERENCES artifacts (id),
    content_hash text NOT NULL DEFAULT '',
    state        text NOT NULL CHECK (state IN ('ready', 'stopped', 'gone')),
    ready_at     timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (task_id, attempt)
);
CREATE INDEX endpoints_campaign ON endpoints (campaign_id, ready_at);
