// node-postgres against pgguard: the scenario tests/compat/test_node_pg.py drives.
// Reads PGHOST/PGPORT from the environment; prints one JSON object per line.
"use strict";
const { Client } = require("pg");
const readline = require("readline");

const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const client = (user) => new Client({ user, database: "postgres", connectionTimeoutMillis: 60000 });

async function main() {
  const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

  // Query, named prepared statement (run twice: parse once, bind twice), transaction.
  // Role "other" has no limit here: closing a session frees its slot only once the server
  // has closed it, so the limited roles below start from a clean slate.
  const c = client("other");
  await c.connect();
  const query = (await c.query("SELECT 1 + 1 AS n")).rows[0].n;
  const stmt = { name: "plus_one", text: "SELECT $1::int + 1 AS n", values: [41] };
  const prepared = [(await c.query(stmt)).rows[0].n, (await c.query({ ...stmt, values: [1] })).rows[0].n];
  await c.query("BEGIN");
  await c.query("CREATE TEMP TABLE t (v int)");
  await c.query("INSERT INTO t VALUES (1), (2)");
  const inside = (await c.query("SELECT count(*)::int AS n FROM t")).rows[0].n;
  await c.query("ROLLBACK");
  const after = (await c.query("SELECT count(*)::int AS n FROM pg_class WHERE relname = 't' AND relpersistence = 't'")).rows[0].n;
  say({ step: "basic", query, prepared, inside, after });
  await c.end();

  // Role "app" has limit 1, policy reject: the second connection gets FATAL 53300.
  const held = client("app");
  await held.connect();
  const extra = client("app");
  try {
    await extra.connect();
    say({ step: "reject", error: null });
  } catch (err) {
    say({ step: "reject", error: { code: err.code, severity: err.severity, message: err.message } });
  }
  await held.end();

  // Role "app2" has limit 1, policy queue: the second connect waits until the first ends.
  const first = client("app2");
  await first.connect();
  const second = client("app2");
  const connecting = second.connect();
  say({ step: "holding" });
  await lines.next(); // the test saw the second client queue at pgguard
  await first.end();
  await connecting;
  const n = (await second.query("SELECT 42 AS n")).rows[0].n;
  say({ step: "queued", n });
  await second.end();
}

main().then(
  () => process.exit(0),
  (err) => {
    say({ step: "error", error: String(err && err.stack || err) });
    process.exit(1);
  },
);
