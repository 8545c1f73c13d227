// graphile-worker's drain of no-op jobs with its "fast" preset (the configuration of its
// performance page: concurrency 24, local queue 500, batched completion), for the dispatch
// benchmark's peer run. Usage: node graphile_drain.js CONNECTION_STRING JOBS
// Prints one JSON line: {"jobs": N, "drain_s": S, "jobs_per_s": R, "version": "..."}.
// Run with NODE_PATH at the scratch install's node_modules.
const { run, makeWorkerUtils } = require("graphile-worker");
const { Logger } = require("@graphile/logger");

// Quiet: logging every job would measure the terminal.
const logger = new Logger(() => () => {});
const version = process.env.GRAPHILE_WORKER_VERSION || "unknown";

async function main() {
  const [connectionString, jobsArg] = process.argv.slice(2);
  const jobs = Number(jobsArg);
  const utils = await makeWorkerUtils({ connectionString, logger });
  await utils.migrate();
  // Enqueued in one add_jobs call, before the clock starts (Flywheel's enqueue is timed
  // separately too).
  await utils.withPgClient((client) =>
    client.query(
      `select graphile_worker.add_jobs(array(
         select json_populate_record(null::graphile_worker.job_spec,
                json_build_object('identifier', 'noop', 'payload', json_build_object('i', i)))
         from generate_series(1, $1::int) i))`,
      [jobs],
    ),
  );
  let done = 0;
  let allRan;
  const ran = new Promise((resolve) => (allRan = resolve));
  const start = process.hrtime.bigint();
  const runner = await run({
    preset: {
      worker: {
        connectionString,
        concurrentJobs: 24,
        maxPoolSize: 25,
        localQueue: { size: 500 },
        completeJobBatchDelay: 0,
        failJobBatchDelay: 0,
        pollInterval: 1000,
      },
    },
    noHandleSignals: true,
    logger,
    taskList: {
      noop: async () => {
        done += 1;
        if (done === jobs) allRan();
      },
    },
  });
  await ran;
  // Drained means every completion is committed: no job row left.
  for (;;) {
    const { rows } = await utils.withPgClient((c) =>
      c.query("select count(*)::int as n from graphile_worker._private_jobs"),
    );
    if (rows[0].n === 0) break;
    await new Promise((r) => setTimeout(r, 5));
  }
  const drain = Number(process.hrtime.bigint() - start) / 1e9;
  await runner.stop();
  await utils.release();
  console.log(JSON.stringify({ jobs, drain_s: drain, jobs_per_s: jobs / drain, version }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
