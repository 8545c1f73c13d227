-- Flywheel's controller state. Only the controller (and the admin commands `migrate` and
-- `token create`) write here. Payloads never live in these rows: artifacts are referenced by URI.

CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    scope       text NOT NULL CHECK (scope IN ('admin', 'worker', 'read')),
    token_hash  text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE campaigns (
    id                   uuid PRIMARY KEY,
    name                 text NOT NULL,
    spec_yaml            text NOT NULL,
    spec                 jsonb NOT NULL,
    status               text NOT NULL CHECK (status IN ('running', 'paused', 'succeeded', 'failed', 'cancelled')),
    rounds_total         int  NOT NULL CHECK (rounds_total > 0),
    current_round        int  NOT NULL DEFAULT 0,
    current_generator_id uuid,
    base_model_id        uuid,
    reward_model_id      uuid,
    created_by           text NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rounds (
    id               uuid PRIMARY KEY,
    campaign_id      uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    round_index      int  NOT NULL,
    status           text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    generator_id     uuid NOT NULL,
    trained_model_id uuid,
    decision         text CHECK (decision IN ('promoted', 'rejected')),
    decision_reason  text,
    metrics          jsonb NOT NULL DEFAULT '{}',
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (campaign_id, round_index)
);
CREATE INDEX rounds_running ON rounds (campaign_id) WHERE status = 'running';

CREATE TABLE pools (
    name       text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workers (
    id                uuid PRIMARY KEY,
    name              text NOT NULL,
    pool              text NOT NULL REFERENCES pools (name),
    backends          text[] NOT NULL,
    gpu_kind          text NOT NULL DEFAULT '',
    gpu_count         int  NOT NULL DEFAULT 0,
    labels            jsonb NOT NULL DEFAULT '{}',
    slots             int  NOT NULL DEFAULT 1,
    status            text NOT NULL CHECK (status IN ('online', 'offline')),
    registered_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- One row per unit of work: a stage shard of a round. `attempt` is the fencing token: it grows by
-- one at every claim, and every worker report must name the current one.
CREATE TABLE tasks (
    id               uuid PRIMARY KEY,
    campaign_id      uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    round_id         uuid NOT NULL REFERENCES rounds (id) ON DELETE CASCADE,
    round_index      int  NOT NULL,
    stage            text NOT NULL,
    stage_order      int  NOT NULL,
    kind             text NOT NULL,
    shard_index      int  NOT NULL,
    shard_count      int  NOT NULL,
    params           jsonb NOT NULL DEFAULT '{}',
    config_hash      text NOT NULL,
    pool             text NOT NULL,
    backend          text NOT NULL,
    gpu_kind         text NOT NULL DEFAULT '',
    gpu_count        int  NOT NULL DEFAULT 0,
    state            text NOT NULL CHECK (state IN ('blocked', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    cancel_requested boolean NOT NULL DEFAULT false,
    attempt          int  NOT NULL DEFAULT 0,
    attempt_base     int  NOT NULL DEFAULT 0,
    max_attempts     int  NOT NULL,
    backoff_initial_ms int NOT NULL,
    backoff_max_ms   int  NOT NULL,
    next_run_at      timestamptz NOT NULL DEFAULT now(),
    worker_id        uuid,
    lease_expires_at timestamptz,
    progress         double precision NOT NULL DEFAULT 0,
    progress_message text NOT NULL DEFAULT '',
    progress_metrics jsonb NOT NULL DEFAULT '{}',
    metrics          jsonb NOT NULL DEFAULT '{}',
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    queued_at        timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz
);
-- Claim order: earlier rounds and stages first. Matches the claim query's ORDER BY so a claim
-- reads only the rows it takes.
CREATE INDEX tasks_claimable ON tasks (pool, round_index, stage_order, next_run_at, shard_index)
    WHERE state = 'queued';
-- Unfinished tasks per stage: "is this stage / round done?" is one index probe.
CREATE INDEX tasks_unfinished ON tasks (round_id, stage) WHERE state <> 'succeeded';
CREATE INDEX tasks_leases ON tasks (lease_expires_at) WHERE state = 'running';
CREATE INDEX tasks_round ON tasks (round_id, stage, shard_index);
CREATE INDEX tasks_failed ON tasks (round_id) WHERE state = 'failed';
CREATE INDEX tasks_ready_promotions ON tasks (campaign_id) WHERE state = 'queued' AND kind = 'promote';
CREATE INDEX tasks_campaign ON tasks (campaign_id, round_index);

CREATE TABLE task_edges (
    task_id    uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    depends_on uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (task_id, depends_on)
);
CREATE INDEX task_edges_depends_on ON task_edges (depends_on);

CREATE TABLE attempts (
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt     int  NOT NULL,
    worker_id   uuid NOT NULL,
    state       text NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'lease_expired', 'cancelled')),
    error       text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (task_id, attempt)
);

CREATE TABLE artifacts (
    id               uuid PRIMARY KEY,
    campaign_id      uuid REFERENCES campaigns (id) ON DELETE CASCADE,
    round_index      int,
    kind             text NOT NULL CHECK (kind IN ('dataset', 'model')),
    name             text NOT NULL,
    uri              text NOT NULL,
    content_hash     text NOT NULL DEFAULT '',
    config_hash      text NOT NULL DEFAULT '',
    producer_task_id uuid REFERENCES tasks (id) ON DELETE CASCADE,
    producer_attempt int,
    generator_id     uuid,
    judge_id         uuid,
    metadata         jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX artifacts_producer ON artifacts (producer_task_id, producer_attempt);
CREATE INDEX artifacts_campaign ON artifacts (campaign_id, created_at);

CREATE TABLE artifact_parents (
    artifact_id uuid NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
    parent_id   uuid NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
    PRIMARY KEY (artifact_id, parent_id)
);

ALTER TABLE campaigns ADD FOREIGN KEY (current_generator_id) REFERENCES artifacts (id) DEFERRABLE INITIALLY DEFERRED;

-- Append-only: rows are inserted, never updated or deleted (except with their campaign).
CREATE TABLE events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    campaign_id uuid REFERENCES campaigns (id) ON DELETE CASCADE,
    task_id     uuid,
    kind        text NOT NULL,
    message     text NOT NULL,
    actor       text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_campaign ON events (campaign_id, id);
