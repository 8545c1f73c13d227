-- Each finished round's data card and model card: markdown documents rendered by the
-- controller from what Postgres recorded of the round (sources, counts, filters, metrics,
-- lineage), with the SHA-256 of their text.
CREATE TABLE round_cards (
    round_id     uuid NOT NULL REFERENCES rounds (id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('data', 'model')),
    markdown     text NOT NULL,
    content_hash text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (round_id, kind)
);
