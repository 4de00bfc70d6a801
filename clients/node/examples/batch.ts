// Starts many sagas in one StartSagas call (one transaction: all of them or none), and
// shows how a refused batch names its bad sagas: `fieldViolations(error)` reads the
// google.rpc.BadRequest details of the error, one violation per bad saga.
//
//   npm run build && node dist/examples/batch.js [--address HOST:PORT] [--count N] [--bad INDEX]
//
// With --bad, the saga at INDEX has no action, so the call is refused and nothing is
// started. Prints one JSON object per line: {"op": "started", "ids": [...]} or
// {"op": "refused", "code": 3, "details": "...", "violations": [{field, description, index}]}.
import { DEFAULT_ADDRESS, SagaplaneClient, fieldViolations } from "../src";

function parseArgs(argv: string[]): { address: string; count: number; bad?: number } {
  const args = { address: DEFAULT_ADDRESS, count: 3, bad: undefined as number | undefined };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--address") args.address = argv[++i];
    else if (arg === "--count") args.count = Number(argv[++i]);
    else if (arg === "--bad") args.bad = Number(argv[++i]);
    else throw new Error(`unknown argument ${arg}`);
  }
  return args;
}

function print(op: string, fields: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify({ op, ...fields }) + "\n");
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const client = new SagaplaneClient(args.address);
  const sagas = Array.from({ length: args.count }, (_, row) => ({
    name: "order.import",
    context: { row, source: "node" },
    steps: [
      { name: "create", action: row === args.bad ? "" : "orders.create", input: { row } },
      { name: "notify", action: "partner.notify" },
    ],
  }));
  try {
    const started = await client.startSagas(sagas, { timeoutMs: 60_000 });
    print("started", { ids: started.map((s) => s.id) });
  } catch (error) {
    const e = error as { code?: number; details?: string };
    if (e.code === undefined) throw error;
    print("refused", { code: e.code, details: e.details, violations: fieldViolations(error) });
  } finally {
    client.close();
  }
}

main().catch((error: unknown) => {
  process.stderr.write(`batch: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exit(1);
});
