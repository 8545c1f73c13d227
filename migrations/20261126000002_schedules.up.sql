-- Cron schedules: each firing creates a campaign from a template, or appends rounds to the
-- schedule's long-running campaign. Only the controller fires them (see ARCHITECTURE.md).
CREATE TABLE schedules (
    id                 uuid PRIMARY KEY,
    name               text NOT NULL UNIQUE,
    cron               text NOT NULL,
    time_zone          text NOT NULL,
    template_yaml      text NOT NULL,
    params             jsonb NOT NULL DEFAULT '{}',
    mode               text NOT NULL CHECK (mode IN ('new_campaign', 'append_rounds')),
    rounds_per_fire    int  NOT NULL DEFAULT 1 CHECK (rounds_per_fire > 0),
    overlap            text NOT NULL CHECK (overlap IN ('skip', 'buffer_one', 'cancel_old', 'allow')),
    catch_up_window_s  int  NOT NULL CHECK (catch_up_window_s >= 0),
    status             text NOT NULL CHECK (status IN ('active', 'paused')),
    -- The next scheduled time not yet handled; every time before it has a schedule_runs row.
    next_fire_at       timestamptz NOT NULL,
    -- The scheduled time of the one firing held back by the buffer_one overlap policy.
    buffered_for       timestamptz,
    -- append_rounds: the campaign that firings extend (created by the first firing).
    target_campaign_id uuid REFERENCES campaigns (id) ON DELETE SET NULL,
    created_by         text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE status = 'active';

-- What happened to each scheduled time: started, appended, buffered, skipped (overlap or missed
-- beyond the catch-up window) or failed. Append-only.
CREATE TABLE schedule_runs (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    schedule_id   uuid NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    scheduled_for timestamptz NOT NULL,
    outcome       text NOT NULL CHECK (outcome IN ('started', 'appended', 'buffered', 'skipped_overlap', 'skipped_missed', 'failed')),
    campaign_id   uuid REFERENCES campaigns (id) ON DELETE SET NULL,
    message       text NOT NULL,
    recorded_at   timestamptz NOT NULL
);
CREATE INDEX schedule_runs_schedule ON schedule_runs (schedule_id, id);
-- A scheduled time starts (or appends) at most once, whichever controller handles it.
CREATE UNIQUE INDEX schedule_runs_once ON schedule_runs (schedule_id, scheduled_for)
    WHERE outcome IN ('started', 'appended');
